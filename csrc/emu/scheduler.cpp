// The CUDA emulator's engine: runs a launch's blocks one at a time, each block's threads as fibers on the calling
// host thread, releasing barriers and warp shuffles only when every thread they need has arrived. See
// csrc/emu/cuda_emu.h for the model and what it reports.
#include "emu/cuda_emu.h"
#include "emu/scheduler.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define LRAG_EMU_ASAN 1
#endif
#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#define LRAG_EMU_TSAN 1
extern "C" void AnnotateIgnoreReadsBegin(const char* file, int line);
extern "C" void AnnotateIgnoreReadsEnd(const char* file, int line);
extern "C" void AnnotateIgnoreWritesBegin(const char* file, int line);
extern "C" void AnnotateIgnoreWritesEnd(const char* file, int line);
#endif

namespace lrag_emu {
namespace {

enum class State { kReady, kBarrier, kShuffle, kExited };

// ThreadSanitizer must see the kernels' memory accesses, not the emulator's own bookkeeping: fibers hand their
// state to the scheduler without synchronising (that is what makes a missing barrier a reported race), so the
// bookkeeping on both sides is hidden from it. TSan keeps this per fiber.
struct HiddenFromTsan {
#if defined(LRAG_EMU_TSAN)
  HiddenFromTsan() {
    AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
    AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
  }
  ~HiddenFromTsan() {
    AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
    AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
  }
#else
  HiddenFromTsan() = default;
#endif
  HiddenFromTsan(const HiddenFromTsan&) = delete;
  HiddenFromTsan& operator=(const HiddenFromTsan&) = delete;
};

// Where a fiber waits: a source location (file:line of __syncthreads or the shuffle).
struct Site {
  const char* file = nullptr;
  int line = 0;
  bool operator==(const Site& o) const { return line == o.line && (file == o.file || std::strcmp(file, o.file) == 0); }
  std::string str() const { return file ? std::string(file) + ":" + std::to_string(line) : std::string("?"); }
};

// Fiber stacks: ample for kernel frames, even with sanitizer redzones. Not larger: AddressSanitizer clears the
// shadow of the whole target stack on every swapcontext, and above 64 KiB of shadow (512 KiB of stack) it does
// so with madvise, a system call per context switch.
constexpr size_t kStackBytes = 128 * 1024;

// A fiber's stack: mmap'ed with a guard page below it, so an overflow faults instead of corrupting a neighbour.
struct Stack {
  void* base = nullptr;  // the mapping, guard page first
  size_t bytes = 0;
  Stack() {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    bytes = kStackBytes + page;
    base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) throw Error("CUDA emulator: cannot map a fiber stack");
    mprotect(base, page, PROT_NONE);
  }
  ~Stack() { munmap(base, bytes); }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  char* bottom() const { return static_cast<char*>(base) + (bytes - kStackBytes); }
};

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<Stack> stack;
  ThreadView view;
  unsigned linear = 0;  // linear thread index in the block
  State state = State::kReady;
  Site site;
  // Shuffle: the value offered, the lane whose value is wanted, the mask, and the result.
  uint64_t offer = 0, result = 0;
  int src_lane = 0;
  unsigned mask = 0;
  std::string fault;  // set when kernel code on this fiber broke an emulator rule
#if defined(LRAG_EMU_ASAN)
  void* fake_stack = nullptr;
#endif
#if defined(LRAG_EMU_TSAN)
  void* tsan_fiber = nullptr;
#endif
};

// Everything about the block being run on this host thread.
struct BlockRun {
  const LaunchConfig* cfg = nullptr;
  const std::function<void()>* body = nullptr;
  std::vector<Fiber> fibers;
  ucontext_t sched_ctx;
  Fiber* running = nullptr;
  // The addresses ThreadSanitizer synchronises barriers on: one per barrier generation, alternating, so that a
  // thread that leaves barrier g late does not acquire what fast threads already released at barrier g + 1.
  char barrier_token[2] = {0, 0};
  unsigned barrier_generation = 0;
  char block_done_token = 0;  // ... and the end of a block
  uint64_t barriers = 0, shuffles = 0;  // released in this launch; added to the global Stats once, at its end
#if defined(LRAG_EMU_ASAN)
  void* sched_fake_stack = nullptr;
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;
#endif
#if defined(LRAG_EMU_TSAN)
  void* sched_tsan_fiber = nullptr;
  ~BlockRun() {  // also after a failed launch: TSan has a limit on live threads (fibers)
    for (Fiber& f : fibers) {
      if (f.tsan_fiber != nullptr) __tsan_destroy_fiber(f.tsan_fiber);
    }
  }
#endif
};

thread_local BlockRun* tl_block = nullptr;
thread_local std::vector<std::unique_ptr<Stack>> tl_stacks;  // reused across blocks and launches

// Options and the launch counter are per host thread (launches run on the calling thread), so threads that
// emulate at the same time neither see each other's fault injection nor perturb each other's schedules.
thread_local Options tl_options;
thread_local uint64_t tl_launch_counter = 0;
std::mutex g_mutex;  // guards the counters and limits below
Stats g_stats;
std::map<const void*, size_t> g_smem_limits;  // per kernel, raised by cudaFuncSetAttribute

[[noreturn]] void fail(const LaunchConfig& cfg, const std::string& what) {
  std::ostringstream os;
  os << "CUDA emulator: " << what << " (kernel " << cfg.name << ", launched at " << cfg.file << ":" << cfg.line
     << ")";
  throw Error(os.str());
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string thread_name(const Fiber& f) {
  const dim3& t = f.view.thread_idx;
  std::ostringstream os;
  os << "thread (" << t.x << "," << t.y << "," << t.z << ")";
  return os.str();
}

// ---- context switches (with the sanitizers told which stack is live) ----------------------------------------

void switch_to_scheduler(BlockRun& b, Fiber& f, bool exiting) {
#if defined(LRAG_EMU_TSAN)
  // Returning to the scheduler never synchronises: fibers order their memory only through barriers, so a
  // missing barrier is a race ThreadSanitizer reports. (Not even on exit: the scheduler resumes the other
  // fibers with a synchronising switch, which would pass the exited thread's writes on to them.) A block's end
  // is ordered through block_done_token instead: released by every exiting fiber, acquired by the scheduler once
  // all have exited, so the next block and the host see everything.
  void* const scheduler = b.sched_tsan_fiber;  // read before the release: nothing of b may be touched after it
  if (exiting) __tsan_release(&b.block_done_token);
  __tsan_switch_to_fiber(scheduler, __tsan_switch_to_fiber_no_sync);
#endif
#if defined(LRAG_EMU_ASAN)
  __sanitizer_start_switch_fiber(exiting ? nullptr : &f.fake_stack, b.sched_stack_bottom, b.sched_stack_size);
#endif
  swapcontext(&f.ctx, &b.sched_ctx);
#if defined(LRAG_EMU_ASAN)
  __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#endif
  (void)exiting;
}

void resume(BlockRun& b, Fiber& f) {
  b.running = &f;
#if defined(LRAG_EMU_TSAN)
  __tsan_switch_to_fiber(f.tsan_fiber, 0);
#endif
#if defined(LRAG_EMU_ASAN)
  __sanitizer_start_switch_fiber(&b.sched_fake_stack, f.stack->bottom(), kStackBytes);
#endif
  swapcontext(&b.sched_ctx, &f.ctx);
#if defined(LRAG_EMU_ASAN)
  __sanitizer_finish_switch_fiber(b.sched_fake_stack, nullptr, nullptr);
#endif
  b.running = nullptr;
}

void fiber_main() {
  BlockRun& b = *tl_block;
  Fiber& f = *b.running;  // read before the kernel runs: the scheduler wrote it before switching here
#if defined(LRAG_EMU_ASAN)
  // The stack we came from is the scheduler's: where every switch back must go.
  __sanitizer_finish_switch_fiber(nullptr, &b.sched_stack_bottom, &b.sched_stack_size);
#endif
  try {
    (*b.body)();
  } catch (const std::exception& e) {
    [[maybe_unused]] const HiddenFromTsan hide;
    if (f.fault.empty()) f.fault = e.what();
  }
  {
    [[maybe_unused]] const HiddenFromTsan hide;
    f.state = State::kExited;
  }
  switch_to_scheduler(b, f, /*exiting=*/true);
  std::abort();  // an exited fiber is never resumed
}

Fiber& running_fiber(const char* what) {
  BlockRun* b = tl_block;
  if (b == nullptr || b->running == nullptr) {
    throw Error(std::string("CUDA emulator: ") + what + " called outside a kernel");
  }
  return *b->running;
}

// ---- one block ----------------------------------------------------------------------------------------------

// The threads that may run, and which runs next. Two legal schedules, chosen per block at random: any ready
// thread (warps drift apart by chance), or warps in a random priority order, each running as far as it can
// before the next one moves (the most skew a GPU can show; it exposes races between warps that a random pick
// almost never reaches). Within a warp, lanes are picked at random.
class ReadyQueue {
 public:
  ReadyQueue(unsigned threads, std::mt19937_64& rng) : rng_(rng) {
    const unsigned warps = (threads + kWarpSize - 1) / kWarpSize;
    rank_.assign(warps, 0);
    if (rng() & 1u) {  // warp priority
      for (unsigned w = 0; w < warps; ++w) rank_[w] = w;
      std::shuffle(rank_.begin(), rank_.end(), rng);
    }
    buckets_.resize(warps);
    for (unsigned i = 0; i < threads; ++i) push(i);
  }
  void push(unsigned thread) {
    buckets_[rank_[thread / kWarpSize]].push_back(thread);
    ++size_;
  }
  bool empty() const { return size_ == 0; }
  unsigned pop() {
    for (std::vector<unsigned>& bucket : buckets_) {
      if (bucket.empty()) continue;
      const size_t pick = std::uniform_int_distribution<size_t>(0, bucket.size() - 1)(rng_);
      const unsigned thread = bucket[pick];
      bucket[pick] = bucket.back();
      bucket.pop_back();
      --size_;
      return thread;
    }
    return 0;  // not reached: callers check empty()
  }

 private:
  std::mt19937_64& rng_;
  std::vector<unsigned> rank_;                   // warp -> bucket
  std::vector<std::vector<unsigned>> buckets_;  // by rank: the ready threads
  size_t size_ = 0;
};

// Completes the shuffle that `first` (a lane that just arrived at one) takes part in, if every lane of its mask
// has arrived; their fibers are made ready. Lanes of disjoint masks shuffle independently. Returns whether it did.
bool release_warp(BlockRun& b, const LaunchConfig& cfg, const Fiber* first, ReadyQueue& ready) {
  const unsigned n = static_cast<unsigned>(b.fibers.size());
  const unsigned w0 = first->linear / kWarpSize * kWarpSize;
  const unsigned lanes = std::min(kWarpSize, n - w0);
  const unsigned existing = lanes == kWarpSize ? 0xFFFFFFFFu : ((1u << lanes) - 1u);
  const unsigned mask = first->mask;
  if ((mask & ~existing) != 0) {
    fail(cfg, "__shfl_xor_sync at " + first->site.str() + " names lanes that do not exist in warp " +
                  std::to_string(w0 / kWarpSize) + " (block of " + std::to_string(n) + " threads)");
  }
  for (unsigned l = 0; l < lanes; ++l) {
    if (!(mask >> l & 1u)) continue;
    const Fiber& f = b.fibers[w0 + l];
    if (f.state != State::kShuffle) return false;  // not all there yet (report_stuck explains a lane that never comes)
    if (!(f.site == first->site) || f.mask != mask) {
      fail(cfg, "divergent warp shuffle: lanes of warp " + std::to_string(w0 / kWarpSize) + " wait at " +
                    first->site.str() + " and at " + f.site.str());
    }
  }
  for (unsigned l = 0; l < lanes; ++l) {
    if (!(mask >> l & 1u)) continue;
    Fiber& f = b.fibers[w0 + l];
    if (f.src_lane < 0 || static_cast<unsigned>(f.src_lane) >= lanes || !(mask >> f.src_lane & 1u)) {
      fail(cfg, "__shfl_xor_sync at " + f.site.str() + ": lane " + std::to_string(l) + " reads lane " +
                    std::to_string(f.src_lane) + ", which does not take part (mask)");
    }
    f.result = b.fibers[w0 + f.src_lane].offer;
  }
  for (unsigned l = 0; l < lanes; ++l) {
    if (!(mask >> l & 1u)) continue;
    b.fibers[w0 + l].state = State::kReady;
    ready.push(w0 + l);
  }
  ++b.shuffles;
  return true;
}

// Releases the block-wide barrier once every thread waits at it (all of them at the same __syncthreads, none
// exited); the fibers are made ready.
void release_barrier(BlockRun& b, const LaunchConfig& cfg, unsigned exited, ReadyQueue& ready) {
  const Fiber* waiting = nullptr;
  for (const Fiber& f : b.fibers) {
    if (f.state != State::kBarrier) continue;
    if (waiting == nullptr) waiting = &f;
    if (!(f.site == waiting->site)) {
      fail(cfg, "divergent __syncthreads: " + thread_name(*waiting) + " waits at " + waiting->site.str() + ", " +
                    thread_name(f) + " at " + f.site.str());
    }
  }
  if (exited > 0) {
    for (const Fiber& f : b.fibers) {
      if (f.state == State::kExited) {
        fail(cfg, "__syncthreads at " + waiting->site.str() + " is not reached by every thread: " + thread_name(f) +
                      " exited while " + thread_name(*waiting) + " waits");
      }
    }
  }
  ++b.barrier_generation;
  for (unsigned i = 0; i < b.fibers.size(); ++i) {
    b.fibers[i].state = State::kReady;
    ready.push(i);
  }
  ++b.barriers;
}

// Describes a block that can make no progress.
[[noreturn]] void report_stuck(BlockRun& b, const LaunchConfig& cfg) {
  for (const Fiber& f : b.fibers) {
    if (f.state != State::kShuffle) continue;
    const unsigned w0 = f.linear / kWarpSize * kWarpSize;
    for (unsigned l = 0; l < kWarpSize && w0 + l < b.fibers.size(); ++l) {
      const Fiber& o = b.fibers[w0 + l];
      if ((f.mask >> l & 1u) && o.state != State::kShuffle) {
        fail(cfg, "warp shuffle at " + f.site.str() + " with a missing lane: " + thread_name(f) + " waits, " +
                      thread_name(o) + (o.state == State::kExited ? " exited" : " waits at " + o.site.str()));
      }
    }
  }
  fail(cfg, "deadlock: no thread of the block can make progress");
}

void run_block(BlockRun& b, const LaunchConfig& cfg, std::mt19937_64& rng) {
  const unsigned n = static_cast<unsigned>(b.fibers.size());
  for (Fiber& f : b.fibers) {
    f.state = State::kReady;
    f.fault.clear();
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack->bottom();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
  }
  // One ready thread at a time runs until its next synchronisation point (a lockstep round-robin over all
  // threads would hide most races between warps).
  ReadyQueue ready(n, rng);
  unsigned exited = 0, at_barrier = 0;
  while (exited < n) {
    if (ready.empty()) {
      if (at_barrier > 0 && at_barrier + exited == n) {
        release_barrier(b, cfg, exited, ready);
        at_barrier = 0;
        continue;
      }
      report_stuck(b, cfg);
    }
    Fiber& f = b.fibers[ready.pop()];
    resume(b, f);
    if (!f.fault.empty()) fail(cfg, thread_name(f) + ": " + f.fault);
    switch (f.state) {
      case State::kExited: ++exited; break;
      case State::kBarrier: ++at_barrier; break;
      case State::kShuffle: release_warp(b, cfg, &f, ready); break;
      case State::kReady: break;  // not reachable: a fiber only returns here when it waits or exits
    }
  }
#if defined(LRAG_EMU_TSAN)
  __tsan_acquire(&b.block_done_token);
#endif
}

// A random number in [1, n) coprime with n (1 when n <= 2).
uint64_t random_coprime(uint64_t n, std::mt19937_64& rng) {
  if (n <= 2) return 1;
  for (;;) {
    const uint64_t a = 1 + rng() % (n - 1);
    uint64_t x = a, y = n;
    while (y != 0) {
      const uint64_t t = x % y;
      x = y;
      y = t;
    }
    if (x == 1) return a;
  }
}

void check_launch(const LaunchConfig& cfg) {
  const dim3 &g = cfg.grid, &bl = cfg.block;
  const uint64_t threads = static_cast<uint64_t>(bl.x) * bl.y * bl.z;
  if (g.x == 0 || g.y == 0 || g.z == 0 || threads == 0) {
    fail(cfg, "invalid configuration argument: empty grid (" + std::to_string(g.x) + "," + std::to_string(g.y) +
                  "," + std::to_string(g.z) + ") or block");
  }
  if (threads > kMaxThreadsPerBlock || bl.z > kMaxBlockZ) {
    fail(cfg, "invalid configuration argument: block (" + std::to_string(bl.x) + "," + std::to_string(bl.y) + "," +
                  std::to_string(bl.z) + ") exceeds 1024 threads or block.z > 64");
  }
  if (g.x > 0x7FFFFFFFu || g.y > kMaxGridYZ || g.z > kMaxGridYZ) {
    fail(cfg, "invalid configuration argument: grid (" + std::to_string(g.x) + "," + std::to_string(g.y) + "," +
                  std::to_string(g.z) + ") exceeds 2^31-1 x 65535 x 65535");
  }
  size_t limit = kDefaultDynamicSmem;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    const auto it = g_smem_limits.find(cfg.kernel);
    if (it != g_smem_limits.end()) limit = it->second;
  }
  if (cfg.dynamic_smem > limit) {
    fail(cfg, "too much dynamic shared memory: " + std::to_string(cfg.dynamic_smem) + " bytes > " +
                  std::to_string(limit) + " (raise it with cudaFuncSetAttribute)");
  }
}

}  // namespace

// ---- the API of cuda_emu.h and scheduler.h ------------------------------------------------------------------

int device_sm_count() {
  static const int sms = [] {
    const char* env = std::getenv("LRAG_EMU_SMS");
    const int v = env ? std::atoi(env) : 0;
    return v > 0 ? v : 132;
  }();
  return sms;
}

const ThreadView& current() {
  [[maybe_unused]] const HiddenFromTsan hide;
  return running_fiber("a built-in variable (threadIdx...)").view;
}

void syncthreads(const char* file, int line) {
  Fiber& f = running_fiber("__syncthreads");
  BlockRun& b = *tl_block;
  if (!tl_options.drop_barrier.empty() && ends_with(Site{file, line}.str(), tl_options.drop_barrier)) {
    return;  // fault injection: this barrier is "removed"
  }
  char* token;
  {
    [[maybe_unused]] const HiddenFromTsan hide;
    f.state = State::kBarrier;
    f.site = {file, line};
    token = &b.barrier_token[b.barrier_generation & 1u];
  }
  (void)token;
#if defined(LRAG_EMU_TSAN)
  __tsan_release(token);  // a barrier orders every thread's memory before it with everything after
#endif
  switch_to_scheduler(b, f, false);
#if defined(LRAG_EMU_TSAN)
  __tsan_acquire(token);
#endif
}

uint64_t shuffle_xor(unsigned mask, uint64_t bits, int lane_mask, int width, const char* file, int line) {
  Fiber& f = running_fiber("__shfl_xor_sync");
  BlockRun& b = *tl_block;
  [[maybe_unused]] const HiddenFromTsan hide;  // a shuffle moves registers, not memory: nothing here is the kernel's memory
  const unsigned lane = f.linear % kWarpSize;
  if (width != static_cast<int>(kWarpSize)) {
    f.fault = "__shfl_xor_sync at " + Site{file, line}.str() + ": only width 32 is emulated";
  } else if (!(mask >> lane & 1u)) {
    f.fault = "__shfl_xor_sync at " + Site{file, line}.str() + ": the calling lane " + std::to_string(lane) +
              " is not in its mask";
  }
  if (!f.fault.empty()) {
    f.state = State::kExited;
    switch_to_scheduler(b, f, true);
  }
  f.state = State::kShuffle;
  f.site = {file, line};
  f.mask = mask;
  f.offer = bits;
  f.src_lane = static_cast<int>(lane ^ static_cast<unsigned>(lane_mask));
  switch_to_scheduler(b, f, false);
  return f.result;
}

void set_max_dynamic_smem(const void* kernel, int bytes) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_smem_limits[kernel] = static_cast<size_t>(bytes);
}

void run_grid(const LaunchConfig& cfg, const std::function<void()>& body) {
  if (tl_block != nullptr) fail(cfg, "a kernel launch from inside a kernel");
  [[maybe_unused]] const HiddenFromTsan hide;  // the scheduler's side: the fibers (kernel threads) are not hidden
  check_launch(cfg);
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    ++g_stats.launches;
  }
  std::mt19937_64 rng(tl_options.seed * 0x9E3779B97F4A7C15ull + (++tl_launch_counter));
  const dim3 g = cfg.grid, bl = cfg.block;
  const unsigned threads = bl.x * bl.y * bl.z;
  const uint64_t blocks = static_cast<uint64_t>(g.x) * g.y * g.z;

  BlockRun b;
  b.cfg = &cfg;
  b.body = &body;
  b.fibers.resize(threads);
  while (tl_stacks.size() < threads) tl_stacks.push_back(std::make_unique<Stack>());
  // The fibers borrow this thread's stacks; whatever happens below, they are returned and tl_block is cleared.
  struct Loan {
    BlockRun& b;
    ~Loan() {
      tl_block = nullptr;
      for (size_t i = 0; i < b.fibers.size(); ++i) {
        if (b.fibers[i].stack) tl_stacks[i].reset(b.fibers[i].stack.release());
      }
    }
  } loan{b};
  for (unsigned i = 0; i < threads; ++i) {
    b.fibers[i].stack.reset(tl_stacks[i].release());
    b.fibers[i].linear = i;
    b.fibers[i].view.thread_idx = dim3(i % bl.x, (i / bl.x) % bl.y, i / (bl.x * bl.y));
    b.fibers[i].view.block_dim = bl;
    b.fibers[i].view.grid_dim = g;
  }
  // Dynamic shared memory: exactly the requested bytes (AddressSanitizer catches overruns), garbage-filled.
  std::unique_ptr<unsigned char[]> smem(new unsigned char[std::max<size_t>(cfg.dynamic_smem, 1)]);
  for (Fiber& f : b.fibers) f.view.dynamic_smem = smem.get();
#if defined(LRAG_EMU_TSAN)
  b.sched_tsan_fiber = __tsan_get_current_fiber();
  for (Fiber& f : b.fibers) f.tsan_fiber = __tsan_create_fiber(0);
#endif

  // Blocks in a random order (blocks of a grid may run in any order on a GPU): i -> (a * i + c) mod blocks with
  // gcd(a, blocks) = 1 is a bijection that needs no memory, whatever the grid's size.
  const uint64_t stride = random_coprime(blocks, rng), offset = rng() % blocks;
  tl_block = &b;
  for (uint64_t i = 0; i < blocks; ++i) {
    const uint64_t id = static_cast<uint64_t>((static_cast<unsigned __int128>(stride) * i + offset) % blocks);
    const dim3 bi(static_cast<unsigned>(id % g.x), static_cast<unsigned>(id / g.x % g.y),
                  static_cast<unsigned>(id / (static_cast<uint64_t>(g.x) * g.y)));
    for (Fiber& f : b.fibers) f.view.block_idx = bi;
    for (size_t j = 0; j < cfg.dynamic_smem; ++j) smem[j] = static_cast<unsigned char>(rng());
    run_block(b, cfg, rng);
  }
  std::lock_guard<std::mutex> lock(g_mutex);
  g_stats.blocks += blocks;
  g_stats.threads += blocks * threads;
  g_stats.barriers += b.barriers;
  g_stats.shuffles += b.shuffles;
}

void set_options(const Options& o) { tl_options = o; }

Options options() { return tl_options; }

Stats stats() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_stats;
}

}  // namespace lrag_emu

cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) > lrag_emu::kMaxOptInDynamicSmem) {
    return cudaErrorInvalidValue;
  }
  lrag_emu::set_max_dynamic_smem(kernel, value);
  return cudaSuccess;
}
