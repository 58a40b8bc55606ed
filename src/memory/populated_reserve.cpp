#include "memory/populated_reserve.hpp"

#include <fcntl.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <fstream>
#include <sstream>
#include <thread>
#include <utility>

#include "memory/page_populator.hpp"
#include "memory/system_calls.hpp"
#include "tensorreg/common/error.hpp"

namespace tensorreg::memory {
namespace {

// Populated a slice at a time: a daemon stopping mid-refill waits for one slice only, and the
// mmap lock that a populate holds is let go between slices.
constexpr std::uint64_t refill_slice_bytes = std::uint64_t{8} << 20;
// While the daemon is busy, the refill looks again this often.
constexpr auto busy_poll = std::chrono::milliseconds(20);
// How late a refill may notice that the spare was taken (take() may not wake it).
constexpr auto taken_poll = std::chrono::milliseconds(200);
// After a refill failed (the memory could not be had), the next try waits this long.
constexpr auto refill_retry = std::chrono::seconds(10);
// A refill starts once no put has taken a spare for this long: puts that come in a burst keep
// the cores and the memory bandwidth to themselves.
constexpr auto refill_quiet = std::chrono::seconds(2);

// The host's MemAvailable now; nullopt when /proc/meminfo cannot be read.
std::optional<std::uint64_t> host_mem_available() {
  std::ifstream in("/proc/meminfo");
  if (!in) return std::nullopt;
  std::stringstream text;
  text << in.rdbuf();
  return mem_available_bytes(text.str());
}

}  // namespace

std::optional<std::uint64_t> mem_available_bytes(std::string_view meminfo) {
  constexpr std::string_view key = "MemAvailable:";
  const auto at = meminfo.find(key);
  if (at == std::string_view::npos) return std::nullopt;
  std::uint64_t kib = 0;
  const char* first = meminfo.data() + at + key.size();
  const char* last = meminfo.data() + meminfo.size();
  while (first != last && *first == ' ') ++first;
  const auto [end, ec] = std::from_chars(first, last, kib);
  if (ec != std::errc{} || end == first) return std::nullopt;
  return kib * 1024;
}

populated_reserve::populated_reserve(std::uint64_t bytes, std::string name, std::function<bool()> busy)
    : bytes_(bytes), name_(std::move(name)), busy_(std::move(busy)) {
  TENSORREG_ASSERT(bytes > 0);
  refiller_ = std::thread([this] { refill_loop(); });
}

populated_reserve::~populated_reserve() {
  {
    const std::lock_guard lock(sleep_mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  refiller_.join();
  delete spare_.exchange(nullptr);
}

populated_reserve::spare::~spare() {
  if (!mapping.empty()) ::munmap(mapping.data(), mapping.size());
}

std::optional<shared_memory> populated_reserve::take(std::uint64_t size) {
  if (size == 0 || size < bytes_ / 2) return std::nullopt;
  std::unique_ptr<spare> taken(spare_.exchange(nullptr));
  if (!taken) return std::nullopt;
  ++taken_;
  last_take_ = std::chrono::steady_clock::now().time_since_epoch().count();
  wake_.notify_all();
  if (!sys::check_allocation("shared memory '" + name_ + "'", size)) return std::nullopt;
  const int fd = taken->fd.get();
  if (sys::ftruncate(fd, size) != 0) return std::nullopt;
  // Sealed as shared_memory::create() seals: other processes map it, so its size is final.
  if (::fcntl(fd, F_ADD_SEALS, F_SEAL_GROW | F_SEAL_SHRINK) != 0) return std::nullopt;
  // The mapping is cut or grown to the new size, page tables kept: no page past the end stays
  // mapped, and a grown tail is mapped (and faulted in) as a fresh memfd's would be.
  const auto page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
  const auto whole_pages = [&](std::uint64_t n) { return static_cast<std::size_t>((n + page - 1) / page * page); };
  const std::size_t wanted = whole_pages(size);
  std::span<std::byte> mapping = taken->mapping;  // whole pages
  if (wanted < mapping.size()) {
    ::munmap(mapping.data() + wanted, mapping.size() - wanted);
    mapping = mapping.first(wanted);
  } else if (wanted > mapping.size()) {
    void* grown = ::mremap(mapping.data(), mapping.size(), wanted, MREMAP_MAYMOVE);
    if (grown == MAP_FAILED) return std::nullopt;  // the spare's destructor unmaps the old one
    mapping = {static_cast<std::byte*>(grown), wanted};
  }
  taken->mapping = {};
  return shared_memory::adopt_mapping(std::move(taken->fd), mapping.first(static_cast<std::size_t>(size)));
}

std::uint64_t populated_reserve::ready_bytes() const { return spare_.load() != nullptr ? bytes_ : 0; }

std::uint64_t populated_reserve::taken() const { return taken_.load(); }

void populated_reserve::refill_loop() {
  // The refill runs only on cores nothing else wants (the kernel's zeroing too, which runs in
  // this thread): it must never slow the puts and hashes it is there to speed up.
  const sched_param idle{};
  if (::sched_setscheduler(::gettid(), SCHED_IDLE, &idle) != 0) {
    (void)::setpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()), 19);
  }
  using clock = std::chrono::steady_clock;
  std::unique_lock lock(sleep_mutex_);
  while (!stopping_) {
    if (spare_.load() != nullptr) {
      wake_.wait_for(lock, taken_poll, [&] { return stopping_ || spare_.load() == nullptr; });
      continue;
    }
    const auto quiet_from = clock::time_point(clock::duration(last_take_.load())) + refill_quiet;
    if (clock::now() < quiet_from) {
      wake_.wait_until(lock, quiet_from, [&] { return stopping_.load(); });
      continue;
    }
    lock.unlock();
    std::unique_ptr<spare> made = make_spare();
    lock.lock();
    if (made) {
      spare_.store(made.release());
    } else if (!stopping_) {
      wake_.wait_for(lock, refill_retry, [&] { return stopping_.load(); });
    }
  }
}

std::unique_ptr<populated_reserve::spare> populated_reserve::make_spare() {
  const auto stopping = [&] { return stopping_.load(); };
  // Unknown (no /proc) counts as enough: the populate itself then finds out.
  if (const auto available = host_mem_available(); available && *available / 2 < bytes_) return {};
  auto made = std::make_unique<spare>();
  made->fd = unique_fd(sys::memfd_create(name_.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!made->fd || sys::ftruncate(made->fd.get(), bytes_) != 0) return {};
  void* base = sys::mmap(static_cast<std::size_t>(bytes_), PROT_READ | PROT_WRITE, MAP_SHARED, made->fd.get());
  if (base == MAP_FAILED) return {};
  auto* bytes = static_cast<std::byte*>(base);
  const auto page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
  made->mapping = {bytes, static_cast<std::size_t>((bytes_ + page - 1) / page * page)};
  bool complete = true;
  for (std::uint64_t at = 0; at < bytes_; at += refill_slice_bytes) {
    while (busy_ && busy_() && !stopping()) std::this_thread::sleep_for(busy_poll);
    if (stopping()) {
      complete = false;
      break;
    }
    const std::uint64_t length = std::min(refill_slice_bytes, bytes_ - at);
    // A kernel before 5.14, or memory that could not be had: no spare (touching the pages
    // instead could end in SIGBUS where the memory is short).
    if (!populate_for_write(bytes + at, length)) {
      complete = false;
      break;
    }
  }
  if (!complete) return {};
  return made;
}

}  // namespace tensorreg::memory
