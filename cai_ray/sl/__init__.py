"""Supervised CAI (paper section 3): critique -> revision chains, SFT rows, the SFT objective and losses."""
