// Small helpers of the `qmoe` command-line tool: argument parsing, process
// memory, a progress line on stderr, timing and a tiny JSON writer.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace qmoe::cli {

/// A bad command line: the tool prints the message and exits with code 2.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// One option of a subcommand: "--name" and whether it takes a value.
struct OptionSpec {
  std::string name;
  bool takes_value;
};

/// Parses `--name value`, `--name=value` and `--flag` against a fixed list of
/// options. Anything else (unknown option, positional argument, missing or
/// repeated value) is a UsageError naming the subcommand.
class Args {
 public:
  Args(std::string command, const std::vector<std::string>& argv, const std::vector<OptionSpec>& spec);

  bool flag(const std::string& name) const { return values_.count(name) != 0; }
  std::optional<std::string> value(const std::string& name) const;

  /// Integer option in [lo, hi]; `fallback` when absent.
  std::int64_t integer(const std::string& name, std::int64_t fallback, std::int64_t lo, std::int64_t hi) const;
  /// Non-negative real option; `fallback` when absent.
  double real(const std::string& name, double fallback) const;
  /// Comma-separated list of integers in [lo, hi]; `fallback` when absent.
  std::vector<std::int64_t> integer_list(const std::string& name, std::vector<std::int64_t> fallback, std::int64_t lo,
                                         std::int64_t hi) const;

  /// A UsageError "qmoe <command>: <what> (see qmoe <command> --help)".
  UsageError error(const std::string& what) const;

 private:
  std::string command_;
  std::map<std::string, std::string> values_;
};

/// Parses a whole decimal integer; nullopt when the text is not one.
std::optional<std::int64_t> parse_int(const std::string& s);

/// Resident set size of this process (VmRSS of /proc/self/status), bytes; 0 if unknown.
std::size_t rss_bytes();
/// Peak resident set size (VmHWM), bytes; 0 if unknown.
std::size_t peak_rss_bytes();
/// Resets the peak to the current RSS (/proc/self/clear_refs "5"); false where
/// the kernel does not allow it (then peak_rss_bytes() is the process's peak).
bool reset_peak_rss();
/// Reads a whole file through a small buffer (not mapped: this process's RSS
/// does not grow), so that it sits in the page cache. Returns the bytes read.
std::uint64_t read_into_page_cache(const std::string& path);
/// Returns freed heap memory to the system (glibc malloc_trim), so that RSS
/// measurements see frees of small and medium allocations too.
void release_free_memory();

/// The 1-minute load average (/proc/loadavg); negative if unknown. Other
/// processes competing for the cores make timings noisy; the tool says so.
double load_average();

/// CPU time of the whole machine and of this process at one moment; two of them
/// give how much other processes competed with the timed work in between.
struct CpuSnapshot {
  double wall = 0, busy = 0, steal = 0, own = 0;  // seconds
};
CpuSnapshot cpu_snapshot();
/// Cores that other processes kept busy, and cores the hypervisor stole, on
/// average between two snapshots (0 where /proc/stat is unavailable).
struct Competition {
  double other_cores = 0, steal_cores = 0;
};
Competition cpu_competition(const CpuSnapshot& before, const CpuSnapshot& after);

/// The last-level (L3) cache size in bytes as Linux reports it for cpu0
/// (/sys/devices/system/cpu/cpu0/cache/index*/size of the level-3 entry);
/// 0 when the system does not say.
std::size_t llc_bytes();

/// The CPU's model name (/proc/cpuinfo "model name"); empty if unknown.
std::string cpu_model();

/// Seconds on a monotonic clock.
inline double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

/// "1.23 GiB", "456.7 MiB", "12.0 KiB".
std::string human_bytes(double bytes);
/// Signed variant: "+1.23 GiB" / "-456.7 MiB".
std::string human_delta(double bytes);
/// printf-style formatting into a std::string.
std::string fmt(const char* format, ...) __attribute__((format(printf, 1, 2)));

/// A status line on stderr. On a terminal it redraws in place (a bar with
/// percentage, elapsed time and estimate); otherwise it prints a line at most
/// once a second. Nothing is drawn for work that finishes within a second,
/// except the final "done" line of begin()/end() pairs.
class Progress {
 public:
  /// With `announce`, the label is shown at once (for work without steps).
  explicit Progress(std::string label, bool announce = false);
  /// done of total units finished.
  void update(std::int64_t done, std::int64_t total);
  /// Ends the line: "<label> ... done in 3.2 s" (plus `detail`).
  void finish(const std::string& detail = "");
  double elapsed() const { return now_s() - start_; }

 private:
  std::string label_;
  double start_, last_draw_ = 0;
  bool tty_, drawn_ = false;
};

/// A minimal JSON writer: objects and arrays, with commas handled.
class Json {
 public:
  Json& begin_object(const std::string& key = "");
  Json& end_object();
  Json& begin_array(const std::string& key = "");
  Json& end_array();
  Json& field(const std::string& key, const std::string& v);
  Json& field(const std::string& key, const char* v) { return field(key, std::string(v)); }
  Json& field(const std::string& key, double v);  // non-finite -> null
  Json& field(const std::string& key, std::int64_t v);
  Json& field(const std::string& key, int v) { return field(key, static_cast<std::int64_t>(v)); }
  Json& field(const std::string& key, std::size_t v) { return field(key, static_cast<std::int64_t>(v)); }
  Json& field(const std::string& key, bool v);
  std::string str() const { return out_.str() + "\n"; }

 private:
  void prefix(const std::string& key);
  static std::string quote(const std::string& s);
  std::ostringstream out_;
  std::vector<bool> first_{true};
  int depth_ = 0;
};

}  // namespace qmoe::cli
