"""A teacher with another tokenizer: what tokens spell (``vocabulary``), the alignment of two tokenizations of one
text (``alignment``) and the loss over them (``loss``)."""
