"""Private helpers of stablecore.methods.colide."""
