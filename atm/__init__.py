"""atm: pretrain, distil, fine-tune and evaluate NLU encoders the Alexa Teacher Model way."""

__version__ = "0.1.0"
