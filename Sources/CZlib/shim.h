// zlib (Debian: zlib1g-dev): inflate/deflate with the gzip wrapper, for .nii.gz files (IO/Gzip.swift).
#include <zlib.h>
