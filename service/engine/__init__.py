"""Inference engines behind one narrow protocol (`base.Engine`); only backends import vLLM."""
