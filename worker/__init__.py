"""angelstream worker: Angel One SmartStream → normalized ticks → one Redis stream per symbol."""
