// Replays fuzz inputs without libFuzzer: every argument is a file or a directory (read in name order, not
// recursively), and each file's bytes go once through the target's LLVMFuzzerTestOneInput. Linked with a
// target's source, it makes the committed corpus an ordinary ctest for any compiler; a failing oracle aborts.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size);

namespace {

std::vector<std::uint8_t> read_bytes(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s <corpus dir or file>...\n", argv[0]);
    return 2;
  }
  std::size_t n_inputs = 0;
  for (int a = 1; a < argc; ++a) {
    const std::filesystem::path arg(argv[a]);
    std::vector<std::filesystem::path> files;
    if (std::filesystem::is_directory(arg)) {
      for (const auto& entry : std::filesystem::directory_iterator(arg))
        if (entry.is_regular_file()) files.push_back(entry.path());
      std::sort(files.begin(), files.end());
    } else if (std::filesystem::is_regular_file(arg)) {
      files.push_back(arg);
    } else {
      std::fprintf(stderr, "%s: no such file or directory\n", argv[a]);
      return 2;
    }
    for (const auto& file : files) {
      const std::vector<std::uint8_t> bytes = read_bytes(file);
      // An empty vector's data() may be null; the fuzzer passes a valid pointer even for size 0.
      static const std::uint8_t empty = 0;
      LLVMFuzzerTestOneInput(bytes.empty() ? &empty : bytes.data(), bytes.size());
      ++n_inputs;
    }
  }
  std::printf("replayed %zu inputs\n", n_inputs);
  // A corpus that vanished would make the test pass vacuously.
  return n_inputs > 0 ? 0 : 1;
}
