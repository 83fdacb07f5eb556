"""Input data: COCO reading, train transforms, targets, the train input (worker processes)."""
