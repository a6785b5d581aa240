"""SUN RGB-D 37-class RGB-D segmentation in the official CEN list layout (manual download)."""
