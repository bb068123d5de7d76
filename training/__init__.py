"""Training and evaluation code that builds and judges the engines' weights."""
