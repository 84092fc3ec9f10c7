"""Training data: image and mask pairs from folders and PASCAL VOC (`samples`), and masks drawn from
annotation-tool exports (`coco`, `labelme`, `cvat`)."""
