"""COCO person keypoint constants shared by data, grouping and drawing.

Joint order is COCO's (and mmpose's `dataset_info` for coco):
0 nose, 1/2 eyes, 3/4 ears, 5/6 shoulders, 7/8 elbows, 9/10 wrists,
11/12 hips, 13/14 knees, 15/16 ankles (left first in each pair).
"""

import numpy as np

NUM_JOINTS = 17
MAX_PEOPLE = 30  # mmpose max_num_people (targets and grouping).

JOINT_NAMES = (
    'nose', 'left_eye', 'right_eye', 'left_ear', 'right_ear',
    'left_shoulder', 'right_shoulder', 'left_elbow', 'right_elbow',
    'left_wrist', 'right_wrist', 'left_hip', 'right_hip', 'left_knee',
    'right_knee', 'left_ankle', 'right_ankle')

# Index of the mirrored joint: used for horizontal flip (train and test).
FLIP_INDEX = np.array(
    [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15], np.int32)

# Limbs as 0-based joint pairs (COCO `skeleton` minus one), for drawing.
SKELETON = np.array(
    [[15, 13], [13, 11], [16, 14], [14, 12], [11, 12], [5, 11], [6, 12],
     [5, 6], [5, 7], [6, 8], [7, 9], [8, 10], [1, 2], [0, 1], [0, 2],
     [1, 3], [2, 4], [3, 5], [4, 6]], np.int32)

# ImageNet normalisation of RGB images in [0, 1] (mmpose NormalizeTensor).
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
