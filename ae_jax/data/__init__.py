"""Input data: COCO reading, train transforms, targets and tf.data pipelines."""
