// The five smaller kernel files as one translation unit. torch's headers take ~14 s to parse per
// translation unit on a 2-core VM, more than most of these files' own code (2-10 s each): as
// five units they cost 100 s of CPU to build, as one 38 s. linear.cpp (72 s of its own code)
// stays its own unit, so the two build side by side (DEVELOPERS.md, "Native kernels").
// Each file keeps its code in its own anonymous namespace and registers its own ops.
#include "attention.cpp"
#include "pieces.cpp"
#include "qlinear.cpp"
#include "sample.cpp"
#include "shm.cpp"
