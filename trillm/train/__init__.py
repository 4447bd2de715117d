"""BitNet b1.58 training: recipe.py (model, BitLinear, schedules), data.py, loop.py, export.py."""
