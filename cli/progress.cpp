#include "progress.hpp"

#include <fmt/core.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace tensorreg::cli {
namespace {

std::chrono::steady_clock::time_point g_command_start = std::chrono::steady_clock::now();

std::size_t terminal_columns() {
  struct winsize ws {};
  if (::ioctl(STDERR_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0) return ws.ws_col;
  return 80;
}

std::string seconds_text(double s) { return fmt::format("{:.1f} s", s); }

}  // namespace

void mark_command_start() noexcept { g_command_start = std::chrono::steady_clock::now(); }

double seconds_waited() noexcept {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - g_command_start).count();
}

std::string human_bytes(std::uint64_t n) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(n);
  int u = 0;
  while (v >= 1024 && u < 4) {
    v /= 1024;
    ++u;
  }
  return u == 0 ? fmt::format("{} B", n) : fmt::format("{:.1f} {}", v, units[u]);
}

bool progress::stderr_is_terminal() noexcept {
  const char* term = std::getenv("TERM");
  return ::isatty(STDERR_FILENO) != 0 && (term == nullptr || std::strcmp(term, "dumb") != 0);
}

progress::progress(std::string label, bool enabled) : label_(std::move(label)), enabled_(enabled) {
  if (!enabled_) return;
  ticker_ = std::thread([this] { tick(); });
}

progress::~progress() { finish(); }

void progress::update(std::uint64_t done, std::uint64_t total) {
  if (!enabled_) return;
  std::lock_guard lock(mutex_);
  const auto now = std::chrono::steady_clock::now();
  if (!have_bytes_) first_bytes_ = now;
  have_bytes_ = true;
  done_ = done;
  total_ = total;
  phase_.clear();
  // At most ten redraws a second, but always the first and the last.
  if (done == total || now - last_draw_ >= std::chrono::milliseconds(100)) draw_locked();
}

void progress::phase(std::string text) {
  if (!enabled_) return;
  std::lock_guard lock(mutex_);
  phase_ = std::move(text);
  draw_locked();
}

void progress::finish() {
  if (!enabled_) return;
  {
    std::lock_guard lock(mutex_);
    if (stopping_) return;
    stopping_ = true;
  }
  stop_.notify_all();
  if (ticker_.joinable()) ticker_.join();
  fmt::print(stderr, "\r\x1b[K");
  std::fflush(stderr);
}

void progress::tick() {
  std::unique_lock lock(mutex_);
  draw_locked();
  while (!stop_.wait_for(lock, std::chrono::milliseconds(200), [this] { return stopping_; })) draw_locked();
}

void progress::draw_locked() {
  const auto now = std::chrono::steady_clock::now();
  last_draw_ = now;
  std::string line = label_ + "  ";
  if (!phase_.empty() || !have_bytes_) {
    // A phase reports no bytes (the daemon hashing, restoring or pulling): a spinner shows that
    // the command is alive, turning with the ticker.
    static constexpr char spinner[] = {'|', '/', '-', '\\'};
    line += spinner[spins_++ % sizeof(spinner)];
    line += ' ';
    line += phase_.empty() ? std::string("starting") : phase_;
  } else {
    const int pct = total_ == 0 ? 100 : static_cast<int>(done_ * 100 / total_);
    const int width = 20;
    const int filled = pct * width / 100;
    const double moving = std::chrono::duration<double>(now - first_bytes_).count();
    line += fmt::format("[{}{}] {:3}%  {} of {}", std::string(static_cast<std::size_t>(filled), '#'),
                        std::string(static_cast<std::size_t>(width - filled), ' '), pct, human_bytes(done_),
                        human_bytes(total_));
    if (moving > 0.05) {
      line += fmt::format("  {}/s", human_bytes(static_cast<std::uint64_t>(static_cast<double>(done_) / moving)));
    }
  }
  line += "  " + seconds_text(seconds_waited());
  // Never wider than the terminal: a wrapped line could not be redrawn in place.
  const std::size_t columns = terminal_columns();
  if (line.size() >= columns) line.resize(columns - 1);
  fmt::print(stderr, "\r{}\x1b[K", line);
  std::fflush(stderr);
}

}  // namespace tensorreg::cli
