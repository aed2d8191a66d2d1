"""Text encoders (docs/backbone.md#text-encoders, docs/data.md#tiny-clip): the tiny CLIP (tiny_clip.py, trained by train_tiny_clip.py) and the frozen
ClipTextEncoder that turns captions into (context, pooled) conditioning (encoder.py).
"""
