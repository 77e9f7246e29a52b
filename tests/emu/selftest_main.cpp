// Runs one case of selftest_kernels.cpp as a program (for the sanitizer builds of the emulator's tests):
//   selftest CASE [SEED]  -> prints the outcome; exit 0 when the case completed with a right result.
#include <cstdio>
#include <cstdlib>

extern "C" void lrag_emu_selftest(const char* name, unsigned long long seed, char* msg, size_t cap);

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s CASE [SEED]\n", argv[0]);
    return 2;
  }
  char msg[4096];
  lrag_emu_selftest(argv[1], argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 0, msg, sizeof msg);
  std::printf("%s: %s\n", argv[1], msg[0] ? msg : "ok");
  return msg[0] ? 1 : 0;
}
