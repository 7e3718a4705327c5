"""angelstream consumers: programs that read the tick streams (candles, tail, other languages)."""
