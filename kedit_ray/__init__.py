"""kedit-ray: edit the facts a language model holds, and evaluate editors at scale on Ray."""

__version__ = "0.1.0"
