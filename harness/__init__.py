"""qharness: accuracy and regression harness for int8 deployment of perception models."""

__version__ = "0.1.0"
