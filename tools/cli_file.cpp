// `qmoe info FILE` (what a qmoe file holds) and the commands that live in the
// Python package (`qmoe onnx ...`), which this tool hands to that package.
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "cli_commands.h"
#include "cli_util.h"
#include "qmoe/file.h"

namespace qmoe::cli {

namespace {

std::string shape_text(const Shape& s) {
  std::string out = "[";
  for (std::size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

}  // namespace

int run_info_file(const std::string& path, const std::vector<std::string>& argv) {
  const Args args("info", argv, {{"--tensors", false}});
  const File f = File::open(path);
  std::printf("%s: qmoe file format %d, %s, %zu layer(s), %zu tensor(s)\n", path.c_str(), kFileFormatVersion,
              human_bytes(static_cast<double>(f.size_bytes())).c_str(), f.layers().size(), f.tensors().size());
  for (const auto& [k, v] : f.metadata()) std::printf("  metadata %s = %s\n", k.c_str(), v.c_str());
  for (const FileLayer& l : f.layers()) {
    const MoeAttributes& a = l.attributes;
    std::printf("layer %s\n", l.name.c_str());
    std::printf("  experts %lld  hidden %lld  inter %lld  k %d  %d-bit  %s%s  %s\n",
                static_cast<long long>(l.shape.num_experts), static_cast<long long>(l.shape.hidden),
                static_cast<long long>(l.shape.inter), a.k, a.expert_weight_bits,
                a.block_size ? ("block " + std::to_string(a.block_size)).c_str() : "row-wise",
                l.tensors.size() &&
                        std::any_of(l.tensors.begin(), l.tensors.end(),
                                    [](const FileTensor& t) { return t.name.find("zero_points") != std::string::npos; })
                    ? " with zero points"
                    : "",
                human_bytes(static_cast<double>(l.weight_bytes)).c_str());
    std::printf("  attributes: %s\n", describe(a).c_str());
    for (const auto& [k, v] : l.metadata) std::printf("  metadata %s = %s\n", k.c_str(), v.c_str());
    auto list = [&](const std::vector<FileTensor>& ts) {
      for (const FileTensor& t : ts)
        std::printf("    %-48s %-8s %-20s %s\n", t.name.c_str(), dtype_name(t.dtype), shape_text(t.shape).c_str(),
                    human_bytes(static_cast<double>(t.nbytes)).c_str());
    };
    if (args.flag("--tensors")) {
      list(l.tensors);
      list(l.extra);
    } else if (!l.extra.empty()) {
      std::string names;
      for (const FileTensor& t : l.extra) names.append(" ").append(t.name, l.name.size() + 1);
      std::printf("  other tensors:%s\n", names.c_str());
    }
  }
  return 0;
}

int run_python(const std::string& module, const std::vector<std::string>& argv) {
  // The interpreter of the environment this tool was installed into (pip puts
  // both in the same bin/), else python3 from PATH.
  std::vector<std::string> candidates;
  char self[PATH_MAX];
  const ssize_t n = ::readlink("/proc/self/exe", self, sizeof self - 1);
  if (n > 0) {
    std::string dir(self, static_cast<std::size_t>(n));
    dir = dir.substr(0, dir.rfind('/'));
    candidates.push_back(dir + "/python3");
    candidates.push_back(dir + "/python");
  }
  std::vector<std::string> args{"python3", "-m", module};
  args.insert(args.end(), argv.begin(), argv.end());
  std::vector<char*> cargs;
  for (auto& a : args) cargs.push_back(a.data());
  cargs.push_back(nullptr);
  for (const std::string& c : candidates)
    if (::access(c.c_str(), X_OK) == 0) {
      // argv[0] must be the path itself: Python finds its environment (a
      // venv's pyvenv.cfg) from argv[0], and a bare "python3" is looked up
      // on PATH, which may be another interpreter.
      args[0] = c;
      cargs[0] = args[0].data();
      ::execv(c.c_str(), cargs.data());
    }
  args[0] = "python3";
  cargs[0] = args[0].data();
  ::execvp("python3", cargs.data());
  std::fprintf(stderr, "qmoe: cannot run python3 -m %s: %s (install the qmoe Python package: pip install .)\n",
               module.c_str(), std::strerror(errno));
  return 1;
}

}  // namespace qmoe::cli
