"""The one training loop (`loop`), the shared trainer config and schedules (`schedule`), and each
family's config and objective (`sae`, `transcoder`, `crosscoder`)."""
