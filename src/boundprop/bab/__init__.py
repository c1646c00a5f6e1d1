"""Complete verification: attacks, branch and bound, the verifier driver."""

from .verifier import VerificationResult, VerifierOptions, verify

__all__ = ["VerificationResult", "VerifierOptions", "verify"]
