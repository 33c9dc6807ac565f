// OpenBLAS's CBLAS interface (Debian: libopenblas-dev). cblas.h also declares
// openblas_set_num_threads, which the engine uses to keep OpenBLAS single-threaded
// inside its own worker threads.
#include <cblas.h>
