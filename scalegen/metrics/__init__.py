"""Pure metric mathematics: bits/dim, FID, KID, IS."""
