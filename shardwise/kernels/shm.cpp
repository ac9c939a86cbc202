// The shared-memory all-reduce (shardwise/shm.py) without Python in the loop.
//
// A decode step of a tensor-parallel model issues two all-reduces a layer, each of a few KiB.
// Through Python (custom operator -> comm -> ShmCommunicator) one costs ~50-110 us of
// interpreter work on a two-core host, more than the message's copy and sum by far; from a
// compiled graph's C++ wrapper this operator runs in a few microseconds. The protocol is
// ShmCommunicator's exactly (the same segment, flags, slots, sequence number and summation
// order), so its Python collectives and this operator interleave on one segment:
//
//   segment = flags (2 x t int64: arrive, done) | 2 sets x (t input slots + 1 result area)
//
// ShmCommunicator attaches a segment under its group's name (shm_attach); the operator looks it
// up by that name, as the Python operator resolves its process group. A peer that died or did
// not arrive within the timeout raises (the message says which rank), as the Python path does.
#include <ATen/ATen.h>  // not torch/extension.h: no Python bindings here, a third of the compile
#include <torch/library.h>

#include "simd.h"

#include <sched.h>
#include <signal.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <iterator>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

constexpr int64_t FLAG_BYTES = 4096;   // shm.py's _FLAG_BYTES
constexpr int64_t SMALL = 64 << 10;    // shm.py's SMALL: one barrier up to this many bytes

struct Segment {
  uint8_t* base = nullptr;
  int64_t rank = 0, t = 1, capacity = 0;
  std::vector<int64_t> pids;
  double timeout_s = 300.0;
  int64_t* seq = nullptr;  // ShmCommunicator's call counter (shared with Python)
  at::Tensor keep_segment, keep_seq;

  int64_t* flags(int phase) const { return reinterpret_cast<int64_t*>(base) + phase * t; }
  uint8_t* slot(int64_t set, int64_t i) const {
    return base + FLAG_BYTES + (set * (t + 1) + i) * capacity;
  }
};

std::mutex registry_mutex;
std::unordered_map<std::string, Segment> registry;
std::atomic<int64_t> n_calls{0}, n_bytes{0}, n_nanos{0};

bool alive(int64_t pid) {
  if (kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) return false;
  std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
  if (!f) return true;
  std::string s((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  auto close = s.rfind(')');  // a zombie (exited, not yet reaped) is dead too
  return !(close != std::string::npos && close + 2 < s.size() && s[close + 2] == 'Z');
}

std::string rank_list(const std::vector<int64_t>& ranks) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < ranks.size(); ++i) o << (i ? ", " : "") << ranks[i];
  o << "]";
  return o.str();
}

// Until every rank raised flag `phase` to this call's number. Spins with pause a little (a
// pinned peer arrives within microseconds), then yields the core (a shared core's other rank
// needs it); every 50 ms of waiting it checks for dead peers and the timeout (by the clock: on a
// loaded machine a yield can last a whole time slice, so a count of yields measures no time).
void wait(const Segment& g, int phase) {
  const int64_t target = *g.seq;
  const int64_t* row = g.flags(phase);
  auto arrived = [&] {
    for (int64_t r = 0; r < g.t; ++r)
      if (__atomic_load_n(row + r, __ATOMIC_ACQUIRE) < target) return false;
    return true;
  };
  uint64_t spins = 0;
  auto start = std::chrono::steady_clock::time_point{}, checked = start;
  while (!arrived()) {
    if (++spins < 256) { _mm_pause(); continue; }
    sched_yield();
    if (spins % 16 != 0) continue;
    auto now = std::chrono::steady_clock::now();
    if (start == std::chrono::steady_clock::time_point{}) start = checked = now;
    if (now - checked < std::chrono::milliseconds(50)) continue;
    checked = now;
    std::vector<int64_t> late, dead, dead_pids;
    for (int64_t r = 0; r < g.t; ++r)
      if (__atomic_load_n(row + r, __ATOMIC_ACQUIRE) < target) late.push_back(r);
    for (int64_t r : late)
      if (!alive(g.pids[r])) { dead.push_back(r); dead_pids.push_back(g.pids[r]); }
    TORCH_CHECK(dead.empty(), "shared-memory all_reduce: rank(s) ", rank_list(dead),
                " of the group (pid ", rank_list(dead_pids), ") died mid-collective");
    double waited = std::chrono::duration<double>(now - start).count();
    TORCH_CHECK(waited <= g.timeout_s, "shared-memory all_reduce: rank(s) ", rank_list(late),
                " did not arrive within ", static_cast<int64_t>(g.timeout_s + 0.5), " s");
  }
}

void signal_phase(const Segment& g, int phase) {
  __atomic_store_n(g.flags(phase) + g.rank, *g.seq, __ATOMIC_RELEASE);
}

// out[i] = a[i] + b[i] for i in [lo, hi), the sum rounded to T as torch.add of two T tensors
// rounds it (so bit-identical to shm.py's _reduce_into); out may be a.
template <typename T, typename Acc>
void add2(T* out, const T* a, const T* b, int64_t lo, int64_t hi) {
  for (int64_t i = lo; i < hi; ++i)
    out[i] = static_cast<T>(static_cast<Acc>(a[i]) + static_cast<Acc>(b[i]));
}

#ifdef __AVX512F__
// bf16: 16 lanes widened to fp32, added, rounded to nearest even as c10::BFloat16 rounds
// (NaN -> 0x7FC0); the scalar loop above finishes the tail.
template <>
void add2<at::BFloat16, float>(at::BFloat16* out, const at::BFloat16* a, const at::BFloat16* b,
                               int64_t lo, int64_t hi) {
  int64_t i = lo;
  for (; i + 16 <= hi; i += 16)
    shardwise_simd::store16(out + i, _mm512_add_ps(shardwise_simd::load16(a + i),
                                                   shardwise_simd::load16(b + i)));
  for (; i < hi; ++i)
    out[i] = static_cast<at::BFloat16>(static_cast<float>(a[i]) + static_cast<float>(b[i]));
}
#endif

// out = parts[0] + parts[1] + ... in that order on [lo, hi) (each partial sum rounded to T).
template <typename T, typename Acc>
void reduce(T* out, const std::vector<const T*>& parts, int64_t lo, int64_t hi) {
  if (parts.size() == 1) {
    std::memcpy(out + lo, parts[0] + lo, (hi - lo) * sizeof(T));
    return;
  }
  add2<T, Acc>(out, parts[0], parts[1], lo, hi);
  for (size_t p = 2; p < parts.size(); ++p) add2<T, Acc>(out, out, parts[p], lo, hi);
}

template <typename T, typename Acc>
void all_reduce_into(const Segment& g, const T* src, T* dst, int64_t numel) {
  const int64_t step = g.capacity / static_cast<int64_t>(sizeof(T));
  const bool small = numel * static_cast<int64_t>(sizeof(T)) <= SMALL;
  for (int64_t off = 0; off < numel; off += step) {
    const int64_t n = std::min(step, numel - off);
    const int64_t set = (++*g.seq) % 2;
    std::memcpy(g.slot(set, g.rank), src + off, n * sizeof(T));
    signal_phase(g, 0);
    wait(g, 0);
    std::vector<const T*> parts;
    for (int64_t r = 0; r < g.t; ++r) parts.push_back(reinterpret_cast<const T*>(g.slot(set, r)));
    if (small) {  // every rank sums the whole (small) message itself: one barrier
      reduce<T, Acc>(dst + off, parts, 0, n);
      continue;
    }
    T* result = reinterpret_cast<T*>(g.slot(set, g.t));
    reduce<T, Acc>(result, parts, n * g.rank / g.t, n * (g.rank + 1) / g.t);  // my chunk
    signal_phase(g, 1);
    wait(g, 1);
    std::memcpy(dst + off, result, n * sizeof(T));
  }
}

void shm_attach(const std::string& group, const at::Tensor& segment, int64_t rank, int64_t t,
                int64_t capacity, std::vector<int64_t> pids, double timeout_s,
                const at::Tensor& seq) {
  TORCH_CHECK(segment.dtype() == at::kByte && segment.is_contiguous(), "segment: uint8 bytes");
  TORCH_CHECK(seq.dtype() == at::kLong && seq.numel() == 1, "seq: one int64");
  TORCH_CHECK(static_cast<int64_t>(pids.size()) == t && 0 <= rank && rank < t, "pids, rank, t");
  TORCH_CHECK(segment.numel() >= FLAG_BYTES + 2 * (t + 1) * capacity, "segment too small");
  Segment g;
  g.base = segment.data_ptr<uint8_t>();
  g.rank = rank, g.t = t, g.capacity = capacity, g.pids = std::move(pids);
  g.timeout_s = timeout_s;
  g.seq = seq.data_ptr<int64_t>();
  g.keep_segment = segment, g.keep_seq = seq;
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry[group] = std::move(g);
}

void shm_detach(const std::string& group) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry.erase(group);
}

at::Tensor shm_all_reduce(const at::Tensor& x, const std::string& group) {
  auto start = std::chrono::steady_clock::now();
  const Segment* g;
  {
    std::lock_guard<std::mutex> lock(registry_mutex);
    auto it = registry.find(group);
    TORCH_CHECK(it != registry.end(), "shardwise::shm_all_reduce: no shared-memory segment is "
                "attached for group ", group);
    g = &it->second;  // entries are only erased when their communicator closes
  }
  auto src = x.contiguous();
  auto out = at::empty_like(src, at::MemoryFormat::Contiguous);
  const int64_t numel = src.numel();
  switch (src.scalar_type()) {
    case at::kFloat:
      all_reduce_into<float, float>(*g, src.data_ptr<float>(), out.data_ptr<float>(), numel);
      break;
    case at::kDouble:
      all_reduce_into<double, double>(*g, src.data_ptr<double>(), out.data_ptr<double>(), numel);
      break;
    case at::kBFloat16:
      all_reduce_into<at::BFloat16, float>(*g, src.data_ptr<at::BFloat16>(),
                                           out.data_ptr<at::BFloat16>(), numel);
      break;
    case at::kHalf:
      all_reduce_into<at::Half, float>(*g, src.data_ptr<at::Half>(), out.data_ptr<at::Half>(),
                                       numel);
      break;
    default:
      TORCH_CHECK(false, "shardwise::shm_all_reduce: dtype ", src.scalar_type(),
                  " is not supported (float32, float64, bfloat16, float16)");
  }
  n_calls.fetch_add(1, std::memory_order_relaxed);
  n_bytes.fetch_add(numel * src.element_size(), std::memory_order_relaxed);
  n_nanos.fetch_add(std::chrono::duration_cast<std::chrono::nanoseconds>(
      std::chrono::steady_clock::now() - start).count(), std::memory_order_relaxed);
  return out;
}

// (calls, bytes, nanoseconds) of shm_all_reduce in this process so far: the ledger's count.
std::vector<int64_t> shm_counters() {
  return {n_calls.load(), n_bytes.load(), n_nanos.load()};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(shardwise, m) {
  m.def("shm_attach(str group, Tensor segment, int rank, int t, int capacity, int[] pids, "
        "float timeout_s, Tensor seq) -> ()", &shm_attach);
  m.def("shm_detach(str group) -> ()", &shm_detach);
  m.def("shm_counters() -> int[]", &shm_counters);
  m.def("shm_all_reduce(Tensor x, str group) -> Tensor");
}

TORCH_LIBRARY_IMPL(shardwise, CPU, m) { m.impl("shm_all_reduce", &shm_all_reduce); }
