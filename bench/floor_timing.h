// The clock and the sort of timings that the plain-C floor programs (gather_floor.c,
// dequant_floor.c) share.
#pragma once

#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

// qsort's comparison of doubles, ascending
static int cmp_double(const void* a, const void* b) {
  const double x = *(const double*)a, y = *(const double*)b;
  return x < y ? -1 : x > y;
}
