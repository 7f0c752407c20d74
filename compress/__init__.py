"""peft-compress: model compression for Hugging Face transformers, built as PEFT methods."""
