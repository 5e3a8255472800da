"""Post-training int8 quantization: quantizers, calibrators, quantized modules, rules."""
