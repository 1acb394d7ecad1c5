"""What the embedded digits benchmark contains (folders, domains, classes, counts), in
one place for the builder, the dataset registry and whoever captions the images."""

from __future__ import annotations

FOLDER = "digits"
OPEN_VAL_FOLDER = "digits_open_val"
OPEN_TEST_FOLDER = "digits_open_test"

DOMAINS = ("photo", "sketch", "cartoon", "painting")
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ID_DIGITS = (0, 1, 2, 3, 4, 5)
OPEN_VAL_DIGITS = (6, 7)  # validation-only open set
OPEN_TEST_DIGITS = (8, 9)  # test-only open set

ID_IMAGES_PER_CLASS_PER_DOMAIN = 60
OPEN_IMAGES_PER_CLASS_PER_DOMAIN = 30
VAL_SHARE = 0.2
PRETRAIN_IMAGES_PER_CLASS_PER_DOMAIN = 250
