"""NYUDv2 40-class RGB-D segmentation in the official CEN layout (manual download)."""
