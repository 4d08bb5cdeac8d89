// qmoe — the command-line tool.
//
//   qmoe bench [options]   synthesize a reference-shape layer, prepack, time, check
//   qmoe demo  [options]   the same as bench
//   qmoe info              version, CPU features, kernels chosen, threads
//
// Exit codes: 0 success, 1 qmoe::Error (or another failure), 2 bad command line.
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <new>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include "cli_commands.h"
#include "cli_util.h"
#include "synth.h"

namespace qmoe::cli {

namespace {

constexpr const char* kUsage = R"(usage: qmoe <command> [options]

qmoe runs quantized Mixture-of-Experts layers (ONNX Runtime's com.microsoft::QMoE)
fast on CPU.

commands:
  bench     synthesize a layer of a reference shape, prepack it, time forward()
            and check it against the float64 reference (default: gpt-oss-20b,
            4-bit row-wise, all hardware threads, T = 1, 16, 512)
            --file FILE runs a layer stored in a qmoe file (and reports its load
            speed and memory); --write-file FILE stores the synthetic layer first
  demo      the same as bench
  info      version, CPU features, the kernels chosen, hardware threads
  info FILE the layers of a qmoe file: shapes, bits, block, bytes (--tensors: each tensor)
  onnx      ONNX models (runs the Python package's 'python3 -m qmoe.onnx'):
            'qmoe onnx offload MODEL.onnx -o OUT.onnx' moves every QMoE node's
            weights into a qmoe file beside OUT.onnx and has ONNX Runtime call qmoe
  convert   a Hugging Face MoE checkpoint folder into a qmoe file (runs the
            Python package's 'python3 -m qmoe.hf convert'):
            'qmoe convert CHECKPOINT_DIR -o OUT.safetensors --bits 4 --block 128'

'qmoe <command> --help' describes a command's options; 'qmoe --version' prints the version.
)";

constexpr const char* kInfoHelp = R"(usage: qmoe info [--help]
       qmoe info FILE [--tensors]

Prints the version, the CPU features, the CPU kernels a Layer picks on this
machine (QMOE_CPU_ISA=<name> forces a kernel table), the hardware threads and
the reference shapes known to 'qmoe bench'.
)";

// The kernel a Layer chooses for `bits`: built on a tiny synthetic layer.
std::string kernel_for(int bits) {
  MoeAttributes a;
  a.k = 1;
  a.activation = Activation::silu;
  a.expert_weight_bits = bits;
  tools::SynthOptions so;
  so.bias = false;
  const tools::SynthLayer s = tools::synth_layer(2, 64, 64, a, so);
  LayerOptions lo;
  lo.threads = 1;
  const Layer layer(s.views(), a, lo);
  return layer.kernel_name();
}

std::string cpu_features() {
  std::string f;
  __builtin_cpu_init();
  auto add = [&](bool has, const char* name) {
    if (!has) return;
    if (!f.empty()) f += ' ';
    f += name;
  };
#if defined(__x86_64__) || defined(__i386__)
  add(__builtin_cpu_supports("sse4.2"), "sse4.2");
  add(__builtin_cpu_supports("avx"), "avx");
  add(__builtin_cpu_supports("avx2"), "avx2");
  add(__builtin_cpu_supports("fma"), "fma");
  {
    unsigned a = 0, b = 0, c = 0, d = 0;  // CPUID leaf 1 ECX bit 29 (older compilers lack the "f16c" name)
    add(__get_cpuid(1, &a, &b, &c, &d) && (c >> 29 & 1), "f16c");
  }
  add(__builtin_cpu_supports("avx512f"), "avx512f");
  add(__builtin_cpu_supports("avx512bw"), "avx512bw");
  add(__builtin_cpu_supports("avx512vl"), "avx512vl");
  add(__builtin_cpu_supports("avx512vnni"), "avx512vnni");
  // Newer features straight from CPUID leaf 7 (older compilers' __builtin_cpu_supports
  // does not know their names): sub-leaf 1 EAX bits 4 (AVX-VNNI) and 5 (AVX512-BF16),
  // sub-leaf 0 EDX bit 24 (AMX-TILE).
  unsigned a = 0, b = 0, c = 0, d = 0;
  const bool leaf7_1 = __get_cpuid_count(7, 1, &a, &b, &c, &d);
  add(leaf7_1 && (a >> 5 & 1), "avx512bf16");
  add(leaf7_1 && (a >> 4 & 1), "avxvnni");
  add(__get_cpuid_count(7, 0, &a, &b, &c, &d) && (d >> 24 & 1), "amx-tile");
#else
  f = "(not an x86 CPU)";
#endif
  return f.empty() ? "(none of interest)" : f;
}

}  // namespace

int run_info(const std::vector<std::string>& argv) {
  const Args args("info", argv, {{"--help", false}});
  if (args.flag("--help")) {
    std::fputs(kInfoHelp, stdout);
    return 0;
  }
  const std::string forced = with_environment({}).cpu_kernels;
  std::printf("qmoe %s\n", QMOE_CLI_VERSION);
#if defined(__clang__)
  std::printf("  compiler:          clang %s\n", __clang_version__);
#elif defined(__GNUC__)
  std::printf("  compiler:          gcc %s\n", __VERSION__);
#endif
  std::printf("  hardware threads:  %u\n", std::thread::hardware_concurrency());
  std::printf("  CPU features:      %s\n", cpu_features().c_str());
  std::printf("  QMOE_CPU_ISA:      %s\n", !forced.empty() ? forced.c_str() : "(not set: best kernels for this CPU)");
  std::printf("  kernels:           4-bit %s, 8-bit %s\n", kernel_for(4).c_str(), kernel_for(8).c_str());
  std::printf("  reference shapes (qmoe bench --model):\n");
  for (const auto& m : tools::model_shapes(4, -1))
    std::printf("    %-14s H=%-5lld I=%-6lld E=%-4lld %s\n", m.name.c_str(), static_cast<long long>(m.hidden),
                static_cast<long long>(m.inter), static_cast<long long>(m.experts), describe(m.attrs).c_str());
  return 0;
}

}  // namespace qmoe::cli

int main(int argc, char** argv) {
  using namespace qmoe::cli;
  const std::vector<std::string> all(argv + 1, argv + argc);
  if (all.empty()) {
    std::fputs(kUsage, stderr);
    return 2;
  }
  const std::string cmd = all[0];
  const std::vector<std::string> rest(all.begin() + 1, all.end());
  try {
    if (cmd == "--help" || cmd == "-h" || cmd == "help") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (cmd == "--version") {
      std::printf("qmoe %s\n", QMOE_CLI_VERSION);
      return 0;
    }
    if (cmd == "bench" || cmd == "demo") return run_bench(rest);
    if (cmd == "info" && !rest.empty() && rest[0].rfind("--", 0) != 0)
      return run_info_file(rest[0], std::vector<std::string>(rest.begin() + 1, rest.end()));
    if (cmd == "info") return run_info(rest);
    if (cmd == "onnx") return run_python("qmoe.onnx", rest);
    if (cmd == "convert") {
      std::vector<std::string> args{"convert"};
      args.insert(args.end(), rest.begin(), rest.end());
      return run_python("qmoe.hf", args);
    }
    std::fprintf(stderr, "qmoe: unknown command '%s' (commands: bench, convert, demo, info, onnx; see 'qmoe --help')\n",
                 cmd.c_str());
    return 2;
  } catch (const UsageError& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 2;
  } catch (const qmoe::Error& e) {
    std::fprintf(stderr, "qmoe: error: %s\n", e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "qmoe: error: out of memory\n");
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "qmoe: internal error: %s\n", e.what());
    return 1;
  }
}
