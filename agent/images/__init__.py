"""Images as a modality: decoding (``codec``), the local content-addressed store (``store``), preprocessing."""
