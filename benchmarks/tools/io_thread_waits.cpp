// io_thread_waits — where a running tensorregd's I/O thread waits, seen from outside.
//
// The I/O thread is the daemon's one SCHED_FIFO thread, or its main thread where it may not
// raise its priority. For SECONDS this samples its /proc/PID/task/TID/{stat,syscall,wchan} as
// fast as it can (one core) and sorts every sample into running, idle in epoll_wait, or waiting somewhere else: the syscall, the kernel function
// it sleeps in, and for futexes the lock word's address. A wait longer than --long-ms is listed
// with the return addresses found on its user stack at its start (read through /proc/PID/mem),
// each as module+address, which `addr2line -f -C -i -e MODULE ADDRESS` resolves against the
// unstripped binary. A wait whose samples are far apart was (partly) this process's own delay.
// Needs root (or ptrace rights over the daemon). A poor man's off-CPU profile, for hosts that
// have no perf or eBPF.
//
// Usage: io_thread_waits PID SECONDS [--long-ms MS]
#include <elf.h>
#include <fcntl.h>
#include <fmt/core.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
using clock_type = std::chrono::steady_clock;

std::string read_file(const std::string& path) {
  std::string out;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return out;
  char buf[65536];
  ssize_t n = 0;
  while ((n = ::read(fd, buf, sizeof buf)) > 0) out.append(buf, static_cast<std::size_t>(n));
  ::close(fd);
  return out;
}

// One small /proc file, re-read from an fd kept open.
std::string reread(int fd) {
  char buf[512];
  const ssize_t n = ::pread(fd, buf, sizeof buf - 1, 0);
  return n > 0 ? std::string(buf, static_cast<std::size_t>(n)) : std::string();
}

std::vector<std::string> fields_after_comm(const std::string& stat) {
  std::vector<std::string> out;
  const auto close = stat.rfind(')');
  if (close == std::string::npos) return out;
  std::istringstream in(stat.substr(close + 2));
  for (std::string f; in >> f;) out.push_back(f);
  return out;
}

// The thread of `pid` whose policy (stat field 41) is SCHED_FIFO.
std::optional<std::string> fifo_thread(const std::string& pid) {
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator("/proc/" + pid + "/task", ec)) {
    const auto f = fields_after_comm(read_file(entry.path().string() + "/stat"));
    if (f.size() > 38 && f[38] == "1") return entry.path().filename().string();
  }
  return std::nullopt;
}

struct text_mapping {
  std::uintptr_t begin = 0, end = 0, file_offset = 0;
  std::string path;
};

std::vector<text_mapping> executable_mappings(const std::string& pid) {
  std::vector<text_mapping> out;
  std::istringstream maps(read_file("/proc/" + pid + "/maps"));
  for (std::string line; std::getline(maps, line);) {
    std::istringstream in(line);
    std::string range, perms, offset, dev, inode, path;
    in >> range >> perms >> offset >> dev >> inode >> path;
    if (perms.size() < 3 || perms[2] != 'x' || path.empty()) continue;
    text_mapping m;
    m.begin = std::stoull(range.substr(0, range.find('-')), nullptr, 16);
    m.end = std::stoull(range.substr(range.find('-') + 1), nullptr, 16);
    m.file_offset = std::stoull(offset, nullptr, 16);
    m.path = path;
    out.push_back(m);
  }
  return out;
}

// The link-time address of a file offset: what addr2line takes. From the module's program
// headers (a PIE's text segment is not at its file offset).
std::uintptr_t link_address(const std::string& path, std::uintptr_t file_offset) {
  static std::map<std::string, std::vector<Elf64_Phdr>> cache;
  auto [it, fresh] = cache.try_emplace(path);
  if (fresh) {
    const std::string elf = read_file(path);
    if (elf.size() >= sizeof(Elf64_Ehdr)) {
      Elf64_Ehdr h;
      std::memcpy(&h, elf.data(), sizeof h);
      for (unsigned i = 0; i < h.e_phnum; ++i) {
        const std::size_t at = h.e_phoff + std::size_t{i} * h.e_phentsize;
        if (at + sizeof(Elf64_Phdr) > elf.size()) break;
        Elf64_Phdr p;
        std::memcpy(&p, elf.data() + at, sizeof p);
        if (p.p_type == PT_LOAD) it->second.push_back(p);
      }
    }
  }
  for (const auto& p : it->second) {
    if (file_offset >= p.p_offset && file_offset < p.p_offset + p.p_filesz) return file_offset - p.p_offset + p.p_vaddr;
  }
  return file_offset;
}

// Return addresses on the user stack at `sp`: words that point into executable mappings.
std::string stack_of(int mem_fd, std::uintptr_t sp, const std::vector<text_mapping>& text) {
  std::uint64_t words[4096];
  const ssize_t n = ::pread(mem_fd, words, sizeof words, static_cast<off_t>(sp));
  std::string out;
  int found = 0;
  for (ssize_t i = 0; i < n / 8 && found < 48; ++i) {
    for (const auto& m : text) {
      if (words[i] < m.begin || words[i] >= m.end) continue;
      // Minus one: a return address is the instruction after the call.
      const auto at = link_address(m.path, words[i] - m.begin + m.file_offset) - 1;
      out += fmt::format("    {}+{:#x}\n", m.path, at);
      ++found;
      break;
    }
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    fmt::print(stderr, "usage: io_thread_waits PID SECONDS [--long-ms MS]\n");
    return 2;
  }
  const std::string pid = argv[1];
  const double seconds = std::atof(argv[2]);
  double long_ms = 0.5;
  if (argc > 4 && std::string(argv[3]) == "--long-ms") long_ms = std::atof(argv[4]);

  // tensorregd runs its I/O loop on its main thread, SCHED_FIFO where it may (CAP_SYS_NICE).
  std::optional<std::string> tid;
  for (int tries = 0; tries < 40 && !tid; ++tries) {
    tid = fifo_thread(pid);
    if (!tid) ::usleep(50'000);
  }
  const bool fifo = tid.has_value();
  if (!fifo) tid = pid;
  const std::string task = "/proc/" + pid + "/task/" + *tid + "/";
  const int stat_fd = ::open((task + "stat").c_str(), O_RDONLY | O_CLOEXEC);
  const int syscall_fd = ::open((task + "syscall").c_str(), O_RDONLY | O_CLOEXEC);
  const int wchan_fd = ::open((task + "wchan").c_str(), O_RDONLY | O_CLOEXEC);
  const int mem_fd = ::open(("/proc/" + pid + "/mem").c_str(), O_RDONLY | O_CLOEXEC);
  if (stat_fd < 0 || syscall_fd < 0 || wchan_fd < 0 || mem_fd < 0) {
    fmt::print(stderr, "io_thread_waits: cannot open {}'s /proc files (root needed)\n", task);
    return 1;
  }
  const auto text = executable_mappings(pid);

  struct place {
    std::uint64_t samples = 0, long_waits = 0;
    double longest_ms = 0, long_ms_total = 0;
  };
  std::map<std::string, place> places;
  struct long_wait {
    double ms;
    std::uint64_t samples;
    double max_gap_ms;  // this process's own delays: a wait seen in few samples may be ours
    std::string where, stack;
  };
  std::vector<long_wait> long_waits;

  std::string current;  // where the thread is since `since`
  std::string current_stack;
  clock_type::time_point since{};
  clock_type::time_point last_sample{};
  std::uint64_t samples = 0;
  std::uint64_t current_samples = 0;
  double current_max_gap_ms = 0;
  const auto end =
      clock_type::now() + std::chrono::duration_cast<clock_type::duration>(std::chrono::duration<double>(seconds));
  while (clock_type::now() < end) {
    const auto f = fields_after_comm(reread(stat_fd));
    if (f.empty()) break;  // the thread is gone
    std::string where;
    std::string line;
    if (f[0] == "R") {
      where = "running";
    } else {
      // wchan first: a thread asleep in epoll_wait is idle whatever /proc/.../syscall, read a
      // moment later, says.
      const std::string wchan = reread(wchan_fd);
      line = reread(syscall_fd);
      std::istringstream in(line);
      std::string nr;
      in >> nr;
      if (wchan == "do_epoll_wait" || nr == "232" || nr == "281" || nr == "441") {
        where = "idle (epoll_wait)";
        line.clear();
      } else if (nr == "running") {
        where = "running";
        line.clear();
      } else {
        where = fmt::format("{} syscall {} in {}", f[0], nr, wchan);
        if (nr == "202") {  // futex: which lock word
          std::string word;
          in >> word;
          where += " word " + word;
        }
      }
    }
    ++samples;
    ++places[where].samples;
    const auto now = clock_type::now();
    const double gap_ms = std::chrono::duration<double, std::milli>(now - last_sample).count();
    last_sample = now;
    if (where == current) {
      ++current_samples;
      current_max_gap_ms = std::max(current_max_gap_ms, gap_ms);
      continue;
    }
    if (!current.empty()) {
      const double ms = std::chrono::duration<double, std::milli>(now - since).count();
      auto& p = places[current];
      p.longest_ms = std::max(p.longest_ms, ms);
      if (ms > long_ms && current != "running" && current != "idle (epoll_wait)") {
        ++p.long_waits;
        p.long_ms_total += ms;
        if (long_waits.size() < 100) {
          long_waits.push_back({ms, current_samples, std::max(current_max_gap_ms, gap_ms), current, current_stack});
        }
      }
    }
    current = where;
    since = now;
    current_samples = 1;
    current_max_gap_ms = 0;
    current_stack.clear();
    if (!line.empty()) {
      // "nr arg1..arg6 sp pc" while in a syscall.
      std::istringstream in(line);
      std::vector<std::string> w;
      for (std::string x; in >> x;) w.push_back(x);
      if (w.size() >= 9) current_stack = stack_of(mem_fd, std::stoull(w[7], nullptr, 16), text);
    }
  }

  fmt::print("io_thread_waits: pid {} tid {} ({}), {} samples in {:.1f} s\n", pid, *tid,
             fifo ? "its SCHED_FIFO thread" : "no SCHED_FIFO thread: its main thread", samples, seconds);
  fmt::print("{:>10} {:>8} {:>10} {:>12} {:>11}  where\n", "samples", "share", "waits>long", "ms in them",
             "longest ms");
  for (const auto& [where, p] : places) {
    fmt::print("{:>10} {:>7.3f}% {:>10} {:>12.2f} {:>11.2f}  {}\n", p.samples,
               100.0 * static_cast<double>(p.samples) / static_cast<double>(std::max<std::uint64_t>(1, samples)),
               p.long_waits, p.long_ms_total, p.longest_ms, where);
  }
  for (const auto& w : long_waits) {
    fmt::print("\nwait of {:.2f} ms ({} samples, longest gap between them {:.2f} ms): {}\n{}", w.ms, w.samples,
               w.max_gap_ms, w.where, w.stack);
  }
  return 0;
}
