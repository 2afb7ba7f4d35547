#pragma once
// What every numbered example shares: the command line (--quick, --seed, --out), a CSV file helper and the
// closing "RESULT <name> PASS|FAIL metric=value ..." line that states whether the paper's criterion held.

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <string>
#include <utility>

namespace moe::examples {

struct Cli {
  bool quick = false;       // the shortened run (ctest smoke test)
  std::uint64_t seed = 1;   // every random draw of the run
  std::string out = ".";    // directory for the CSV files (created if missing)
};

/// Parses --quick, --seed=S (or --seed S), --out=DIR (or --out DIR); prints `usage` and exits 2 otherwise.
inline Cli parse_cli(int argc, char** argv, const char* usage) {
  Cli c;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const auto value = [&](const char* flag) -> std::string {
      const std::string f = flag;
      if (a.rfind(f + "=", 0) == 0) return a.substr(f.size() + 1);
      if (a == f && i + 1 < argc) return argv[++i];
      return {};
    };
    std::string v;
    if (a == "--quick") {
      c.quick = true;
    } else if (!(v = value("--seed")).empty()) {
      c.seed = std::stoull(v);
    } else if (!(v = value("--out")).empty()) {
      c.out = v;
    } else {
      std::fprintf(stderr, "unknown argument %s\nusage: %s\n", a.c_str(), usage);
      std::exit(2);
    }
  }
  std::filesystem::create_directories(c.out);
  return c;
}

/// Opens DIR/name for writing, or exits with a message.
inline std::ofstream open_csv(const Cli& cli, const std::string& name) {
  const auto path = std::filesystem::path(cli.out) / name;
  std::ofstream f(path);
  if (!f) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    std::exit(1);
  }
  return f;
}

/// Prints the closing line "RESULT <name> PASS|FAIL k=v ..." on stdout. A FAIL is a finding, not a crash: the
/// smoke tests check that this line is printed (and the run exits 0), the criterion itself is judged on full runs.
inline void report(const char* name, bool pass, std::initializer_list<std::pair<const char*, double>> metrics) {
  std::printf("RESULT %s %s", name, pass ? "PASS" : "FAIL");
  for (const auto& [k, v] : metrics) std::printf(" %s=%.4g", k, v);
  std::printf("\n");
  std::fflush(stdout);
}

}  // namespace moe::examples
