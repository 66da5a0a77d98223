"""eir-server: an Equipment Identity Register answering S13 ECR and N5g-eir checks."""

__version__ = "0.1.0"
