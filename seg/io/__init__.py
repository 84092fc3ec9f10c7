"""Reading and writing images: file formats and sniffing (`images`, `tiff`), lazy region readers for images
larger than memory (`sources`), and streamed mask writers (`writers`)."""
