"""Zero-shot cross-lingual transfer: fine-tune an encoder on English, evaluate every language."""
