"""sealgate: an egress proxy that swaps placeholders for secrets only on requests to their allowed origins."""
