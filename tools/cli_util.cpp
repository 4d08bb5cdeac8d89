#include "cli_util.h"

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <vector>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace qmoe::cli {

// ---------------------------------------------------------------- arguments

Args::Args(std::string command, const std::vector<std::string>& argv, const std::vector<OptionSpec>& spec)
    : command_(std::move(command)) {
  for (std::size_t i = 0; i < argv.size(); ++i) {
    const std::string& a = argv[i];
    if (a.size() < 3 || a.compare(0, 2, "--") != 0) throw error("unexpected argument '" + a + "'");
    const std::size_t eq = a.find('=');
    const std::string name = a.substr(0, eq);
    const OptionSpec* s = nullptr;
    for (const auto& o : spec)
      if (o.name == name) s = &o;
    if (!s) throw error("unknown option '" + name + "'");
    if (values_.count(name)) throw error("option '" + name + "' given twice");
    if (!s->takes_value) {
      if (eq != std::string::npos) throw error("option '" + name + "' takes no value");
      values_[name] = "";
    } else if (eq != std::string::npos) {
      values_[name] = a.substr(eq + 1);
    } else {
      if (i + 1 >= argv.size()) throw error("option '" + name + "' needs a value");
      values_[name] = argv[++i];
    }
  }
}

UsageError Args::error(const std::string& what) const {
  return UsageError("qmoe " + command_ + ": " + what + " (see 'qmoe " + command_ + " --help')");
}

std::optional<std::string> Args::value(const std::string& name) const {
  auto it = values_.find(name);
  if (it == values_.end()) return std::nullopt;
  return it->second;
}

std::optional<std::int64_t> parse_int(const std::string& s) {
  std::int64_t v = 0;
  const char* end = s.data() + s.size();
  auto [p, ec] = std::from_chars(s.data(), end, v);
  if (s.empty() || ec != std::errc() || p != end) return std::nullopt;
  return v;
}

std::int64_t Args::integer(const std::string& name, std::int64_t fallback, std::int64_t lo, std::int64_t hi) const {
  auto v = value(name);
  if (!v) return fallback;
  auto n = parse_int(*v);
  if (!n) throw error(name + ": expected an integer, got '" + *v + "'");
  if (*n < lo || *n > hi)
    throw error(name + ": expected " + std::to_string(lo) + ".." + std::to_string(hi) + ", got " + *v);
  return *n;
}

double Args::real(const std::string& name, double fallback) const {
  auto v = value(name);
  if (!v) return fallback;
  char* end = nullptr;
  const double d = std::strtod(v->c_str(), &end);
  if (v->empty() || *end != '\0' || !std::isfinite(d) || d < 0)
    throw error(name + ": expected a non-negative number, got '" + *v + "'");
  return d;
}

std::vector<std::int64_t> Args::integer_list(const std::string& name, std::vector<std::int64_t> fallback,
                                             std::int64_t lo, std::int64_t hi) const {
  auto v = value(name);
  if (!v) return fallback;
  std::vector<std::int64_t> out;
  std::size_t start = 0;
  while (true) {
    const std::size_t comma = v->find(',', start);
    const std::string item = v->substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    auto n = parse_int(item);
    if (!n) throw error(name + ": expected a comma-separated list of integers, got '" + *v + "'");
    if (*n < lo || *n > hi)
      throw error(name + ": each value must be in " + std::to_string(lo) + ".." + std::to_string(hi) + ", got " + item);
    out.push_back(*n);
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return out;
}

// ---------------------------------------------------------------- memory

namespace {
std::size_t status_bytes(const char* key) {
  std::ifstream f("/proc/self/status");
  std::string line;
  const std::size_t n = std::strlen(key);
  while (std::getline(f, line)) {
    if (line.compare(0, n, key) == 0) {
      std::size_t kb = 0;
      std::sscanf(line.c_str() + n, "%zu", &kb);
      return kb * 1024;
    }
  }
  return 0;
}
}  // namespace

std::size_t rss_bytes() { return status_bytes("VmRSS:"); }
std::size_t peak_rss_bytes() { return status_bytes("VmHWM:"); }

bool reset_peak_rss() {
  std::ofstream f("/proc/self/clear_refs");
  f << "5";
  f.flush();
  return static_cast<bool>(f);
}

std::uint64_t read_into_page_cache(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::vector<char> buf(std::size_t{8} << 20);
  std::uint64_t total = 0;
  while (f) {
    f.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    total += static_cast<std::uint64_t>(f.gcount());
  }
  return total;
}

double load_average() {
  std::ifstream f("/proc/loadavg");
  double l = -1;
  if (!(f >> l)) return -1;
  return l;
}

CpuSnapshot cpu_snapshot() {
  CpuSnapshot c;
  c.wall = now_s();
  const double hz = static_cast<double>(sysconf(_SC_CLK_TCK));
  std::ifstream f("/proc/stat");
  std::string cpu;
  unsigned long long v[8] = {};
  if (f >> cpu && cpu == "cpu") {
    for (auto& x : v) f >> x;
    c.busy = static_cast<double>(v[0] + v[1] + v[2] + v[5] + v[6]) / hz;  // user nice system irq softirq
    c.steal = static_cast<double>(v[7]) / hz;
  }
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);  // every thread of this process
  c.own = static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
          1e-6 * static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
  return c;
}

Competition cpu_competition(const CpuSnapshot& a, const CpuSnapshot& b) {
  const double wall = std::max(b.wall - a.wall, 1e-9);
  Competition c;
  if (a.busy > 0) {
    c.other_cores = std::max(0.0, ((b.busy - a.busy) - (b.own - a.own)) / wall);
    c.steal_cores = (b.steal - a.steal) / wall;
  }
  return c;
}

std::size_t llc_bytes() {
  // index3 is the L3 on the usual x86 layout, but search by level: the order is the kernel's.
  for (int i = 0; i < 16; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    std::ifstream lf(dir + "level");
    int level = 0;
    if (!(lf >> level)) {
      if (i >= 4) break;
      continue;
    }
    if (level != 3) continue;
    std::ifstream sf(dir + "size");
    std::string text;
    if (!(sf >> text)) return 0;
    std::size_t pos = 0;
    while (pos < text.size() && text[pos] >= '0' && text[pos] <= '9') ++pos;
    const auto n = parse_int(text.substr(0, pos));
    if (!n || *n <= 0) return 0;
    const std::string unit = text.substr(pos);
    const std::size_t mult = unit == "K"   ? 1024
                             : unit == "M" ? std::size_t{1} << 20
                             : unit == "G" ? std::size_t{1} << 30
                                           : 1;
    return static_cast<std::size_t>(*n) * mult;
  }
  return 0;
}

std::string cpu_model() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line)) {
    if (line.compare(0, 10, "model name") == 0) {
      const std::size_t colon = line.find(':');
      if (colon == std::string::npos) break;
      std::size_t a = line.find_first_not_of(" \t", colon + 1);
      return a == std::string::npos ? std::string() : line.substr(a);
    }
  }
  return {};
}

void release_free_memory() {
#if defined(__GLIBC__)
  malloc_trim(0);
#endif
}

// ---------------------------------------------------------------- formatting

std::string fmt(const char* format, ...) {
  va_list ap;
  va_start(ap, format);
  char buf[512];
  const int n = std::vsnprintf(buf, sizeof buf, format, ap);
  va_end(ap);
  if (n < 0) return {};
  if (static_cast<std::size_t>(n) < sizeof buf) return std::string(buf, static_cast<std::size_t>(n));
  std::string s(static_cast<std::size_t>(n) + 1, '\0');
  va_start(ap, format);
  std::vsnprintf(s.data(), s.size(), format, ap);
  va_end(ap);
  s.resize(static_cast<std::size_t>(n));
  return s;
}

std::string human_bytes(double b) {
  const double a = std::fabs(b);
  if (a >= 1024.0 * 1024 * 1024) return fmt("%.2f GiB", b / (1024.0 * 1024 * 1024));
  if (a >= 1024.0 * 1024) return fmt("%.1f MiB", b / (1024.0 * 1024));
  if (a >= 1024.0) return fmt("%.1f KiB", b / 1024.0);
  return fmt("%.0f B", b);
}

std::string human_delta(double b) { return std::string(b >= 0 ? "+" : "-").append(human_bytes(std::fabs(b))); }

// ---------------------------------------------------------------- progress

Progress::Progress(std::string label, bool announce)
    : label_(std::move(label)), start_(now_s()), tty_(isatty(STDERR_FILENO) != 0) {
  if (announce && tty_) {
    std::fprintf(stderr, "%s ...", label_.c_str());
    std::fflush(stderr);
    drawn_ = true;
  }
}

void Progress::update(std::int64_t done, std::int64_t total) {
  const double t = now_s(), el = t - start_;
  // Quiet for the first second; then at most 10 redraws/s on a terminal, 1 line/s otherwise.
  if (el < 1.0 || t - last_draw_ < (tty_ ? 0.1 : 1.0)) return;
  last_draw_ = t;
  const double frac = total > 0 ? static_cast<double>(done) / static_cast<double>(total) : 0.0;
  const double eta = frac > 0 ? el * (1 - frac) / frac : 0.0;
  std::string line = label_;
  if (total > 0) {
    constexpr int kWidth = 30;
    const int fill = static_cast<int>(frac * kWidth);
    line += " [" + std::string(static_cast<std::size_t>(fill), '#') +
            std::string(static_cast<std::size_t>(kWidth - fill), ' ') + "] " +
            fmt("%lld/%lld %3.0f%%  %.1f s, ~%.0f s left", static_cast<long long>(done), static_cast<long long>(total),
                100 * frac, el, eta);
  } else {
    line += fmt(" ... %.1f s", el);
  }
  if (tty_)
    std::fprintf(stderr, "\r\033[K%s", line.c_str());
  else
    std::fprintf(stderr, "%s\n", line.c_str());
  std::fflush(stderr);
  drawn_ = true;
}

void Progress::finish(const std::string& detail) {
  const std::string msg = label_ + fmt(" ... done in %.1f s", elapsed()) + (detail.empty() ? "" : " (" + detail + ")");
  if (tty_ && drawn_)
    std::fprintf(stderr, "\r\033[K%s\n", msg.c_str());
  else
    std::fprintf(stderr, "%s\n", msg.c_str());
  std::fflush(stderr);
}

// ---------------------------------------------------------------- JSON

std::string Json::quote(const std::string& s) {
  std::string o = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\')
      o += '\\', o += static_cast<char>(c);
    else if (c == '\n')
      o += "\\n";
    else if (c < 0x20)
      o += fmt("\\u%04x", c);
    else
      o += static_cast<char>(c);
  }
  return o + "\"";
}

void Json::prefix(const std::string& key) {
  if (!first_.back()) out_ << ",";
  first_.back() = false;
  if (depth_ > 0) out_ << "\n" << std::string(static_cast<std::size_t>(2 * depth_), ' ');
  if (!key.empty()) out_ << quote(key) << ": ";
}

Json& Json::begin_object(const std::string& key) {
  prefix(key);
  out_ << "{";
  first_.push_back(true);
  ++depth_;
  return *this;
}

Json& Json::end_object() {
  --depth_;
  first_.pop_back();
  out_ << "\n" << std::string(static_cast<std::size_t>(2 * depth_), ' ') << "}";
  return *this;
}

Json& Json::begin_array(const std::string& key) {
  prefix(key);
  out_ << "[";
  first_.push_back(true);
  ++depth_;
  return *this;
}

Json& Json::end_array() {
  --depth_;
  first_.pop_back();
  out_ << "\n" << std::string(static_cast<std::size_t>(2 * depth_), ' ') << "]";
  return *this;
}

Json& Json::field(const std::string& key, const std::string& v) {
  prefix(key);
  out_ << quote(v);
  return *this;
}

Json& Json::field(const std::string& key, double v) {
  prefix(key);
  if (std::isfinite(v))
    out_ << fmt("%.9g", v);
  else
    out_ << "null";
  return *this;
}

Json& Json::field(const std::string& key, std::int64_t v) {
  prefix(key);
  out_ << v;
  return *this;
}

Json& Json::field(const std::string& key, bool v) {
  prefix(key);
  out_ << (v ? "true" : "false");
  return *this;
}

}  // namespace qmoe::cli
