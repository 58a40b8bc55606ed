// fuzz/fuzz_check.hpp — the one assertion the fuzz targets share.
//
// FUZZ_CHECK(cond, what) prints `what` and aborts when a property of the code under test does
// not hold, so libFuzzer reports the input as a crash (and keeps it) exactly as it does a
// sanitizer report. Properties are checked in every build type, unlike assert().
#pragma once

#include <cstdio>
#include <cstdlib>

#define FUZZ_CHECK(cond, what)                                                                    \
  do {                                                                                            \
    if (!(cond)) {                                                                                \
      std::fprintf(stderr, "%s:%d: property failed: %s (%s)\n", __FILE__, __LINE__, #cond, what); \
      std::abort();                                                                               \
    }                                                                                             \
  } while (false)
