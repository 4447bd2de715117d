"""trillm: one readable inference engine for LLaMA, BitNet b1.58 and gpt-oss."""
