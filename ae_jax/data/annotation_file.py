"""A COCO annotation json read and checked: one-line AnnotationError naming
the file and the image / annotation id, before pycocotools sees it.

The keys mmpose reads, unique ids, every annotation's keypoint count
against its category (and the keypoints trained on), annotations that
point at listed images; a missing `area` is filled from the bbox.
"""

import json


_ANN_KEYS = ('id', 'image_id', 'keypoints', 'iscrowd', 'num_keypoints')
_IMAGE_KEYS = ('id', 'file_name', 'height', 'width')


class AnnotationError(ValueError):
  """A malformed annotation file (message: the file and annotation id)."""


def read_annotations(ann_file: str) -> dict:
  """The json of an annotation file, checked (one-line AnnotationError)."""
  try:
    with open(ann_file, 'rb') as f:
      dataset = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise AnnotationError(f'{ann_file}: not valid json ({e}); truncated or '
                          'not an annotation file?') from None
  if not isinstance(dataset, dict) or not isinstance(
      dataset.get('images'), list) or not isinstance(
          dataset.get('annotations'), list):
    raise AnnotationError(f'{ann_file}: not a COCO annotation file (needs '
                          '"images" and "annotations" lists)')
  return dataset


def _unique_ids(items: list, what: str, ann_file: str) -> set:
  """The ids of `items`; AnnotationError if one is listed twice (pycocotools
  would keep only the last)."""
  ids = set()
  for item in items:
    if item['id'] in ids:
      raise AnnotationError(f'{ann_file}: {what} id {item["id"]} is listed '
                            'twice')
    ids.add(item['id'])
  return ids


def check_annotations(dataset: dict, ann_file: str,
                      num_joints: int | None = None) -> None:
  """Raises AnnotationError naming the file and image / annotation id.

  Checks the keys mmpose reads, the keypoint count of every annotation
  against its category's names (and `num_joints`, the keypoints trained
  on), and
  that annotations point at listed images. Fills a missing `area` from
  the bbox (w * h), which COCOeval's OKS needs.
  """
  for img in dataset['images']:
    missing = [k for k in _IMAGE_KEYS if k not in img]
    if missing:
      raise AnnotationError(f'{ann_file}: image id {img.get("id")} has no '
                            f'{", ".join(missing)}')
  image_ids = _unique_ids(dataset['images'], 'image', ann_file)
  cats = {c.get('id'): c for c in dataset.get('categories') or ()}
  if num_joints is not None:
    counts = {len(c['keypoints']) for c in cats.values()
              if c.get('keypoints')}
    if counts and num_joints not in counts:
      raise AnnotationError(
          f'{ann_file}: its keypoint category lists {min(counts)} joints, '
          f'the config\'s keypoints {num_joints} (config.data.keypoints; '
          "source='annotations' reads them from this file)")
  ann_ids = set()
  for ann in dataset['annotations']:
    missing = [k for k in _ANN_KEYS if k not in ann]
    if missing:
      raise AnnotationError(f'{ann_file}: annotation id {ann.get("id")} has '
                            f'no {", ".join(missing)}')
    if ann['id'] in ann_ids:  # pycocotools keeps only the last one
      raise AnnotationError(f'{ann_file}: annotation id {ann["id"]} is '
                            'listed twice')
    ann_ids.add(ann['id'])
    if ann['image_id'] not in image_ids:
      raise AnnotationError(f'{ann_file}: annotation id {ann["id"]}: image '
                            f'id {ann["image_id"]} is not in "images"')
    cat = cats.get(ann.get('category_id'), {})
    k = len(cat['keypoints']) if cat.get('keypoints') else (
        num_joints)
    values = ann['keypoints']
    if not isinstance(values, list) or len(values) % 3:
      raise AnnotationError(
          f'{ann_file}: annotation id {ann["id"]}: "keypoints" is not a '
          'flat list of (x, y, v) triples')
    if k is not None and len(values) != 3 * k:
      raise AnnotationError(
          f'{ann_file}: annotation id {ann["id"]}: {len(values)} keypoint '
          f'values, its category lists {k} keypoints ({3 * k} expected)')
    if num_joints is not None and len(values) != 3 * num_joints:
      raise AnnotationError(
          f'{ann_file}: annotation id {ann["id"]}: {len(values) // 3} '
          f'keypoints, the config\'s keypoints have {num_joints}')
    if 'area' not in ann and len(ann.get('bbox') or ()) == 4:
      ann['area'] = float(ann['bbox'][2]) * float(ann['bbox'][3])
