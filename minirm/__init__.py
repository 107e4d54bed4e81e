"""minirm: reward modelling and RLHF (HelpSteer2-Preference) on a from-scratch Llama-3."""

__version__ = "0.1.0"
