"""Two-stage chest X-ray inference: lung segmentation, then COVID-19 pneumonia classification."""
