"""Training code that builds the engines' weights (`evaluation/` judges them)."""
