"""Hugging Face interop: tensor mapping (`mapping`), tokenizer export (`tokenizer`), folder conversion
(`convert`). `tools/checkpoint/convert.py` is the command line."""
