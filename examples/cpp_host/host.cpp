// Makes N showers with an exported caloadapt generator (caloadapt export --format torchscript), as
// key4hep/DDML's TorchInference + CaloCloudsTwoAngleModel would: three float32 [1] inputs (energy in GeV,
// local theta and phi in degrees), one flat float32 output read the way convertOutput reads it (the
// header's every 4th entry counts a layer's points, then (x, y, layer, energy) per point, x and y negated).
//
//   caloadapt_host MODEL N ENERGY_GEV THETA_DEG PHI_DEG OUTPUT [SEED]
//
// OUTPUT gets one line per point: shower layer x_mm y_mm energy_mev. One thread; prints ms per shower
// (after three calls that are not timed: TorchScript optimises its graph over the first calls).
#include <ATen/Parallel.h>
#include <torch/script.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

namespace {

// an integer field of the file's JSON metadata ("n_layers": 30)
int metadataInt(const std::string& json, const std::string& key) {
  const std::string pattern = "\"" + key + "\": ";
  const auto at = json.find(pattern);
  if (at == std::string::npos) {
    throw std::runtime_error("metadata has no " + key);
  }
  return std::stoi(json.substr(at + pattern.size()));
}

struct SpacePoint {
  float x, y, energy;
};

}  // namespace

int main(int argc, char** argv) {
  if (argc < 7) {
    std::cerr << "usage: caloadapt_host MODEL N ENERGY_GEV THETA_DEG PHI_DEG OUTPUT [SEED]\n";
    return 2;
  }
  const std::string modelPath = argv[1];
  const int nShowers = std::atoi(argv[2]);
  const float energyGeV = std::atof(argv[3]), thetaDeg = std::atof(argv[4]), phiDeg = std::atof(argv[5]);
  const std::string outputPath = argv[6];
  const int seed = argc > 7 ? std::atoi(argv[7]) : 0;

  at::set_num_threads(1);
  torch::manual_seed(seed);
  torch::jit::ExtraFilesMap extra{{"caloadapt.json", ""}};
  torch::jit::script::Module module = torch::jit::load(modelPath, torch::kCPU, extra);
  module.eval();
  const int nLayer = metadataInt(extra["caloadapt.json"], "n_layers");
  const int outputSize = metadataInt(extra["caloadapt.json"], "output_size");

  const auto options = torch::TensorOptions().dtype(torch::kFloat32);
  std::vector<float> output(outputSize);
  std::ofstream out(outputPath);
  out << "# shower layer x_mm y_mm energy_mev\n";
  torch::NoGradGuard noGrad;
  for (int i = 0; i < 3; ++i) {  // TorchScript optimises its graph over the first calls: not timed, not written
    module.forward({torch::tensor({energyGeV}, options), torch::tensor({thetaDeg}, options),
                    torch::tensor({phiDeg}, options)});
  }
  double seconds = 0.0;
  for (int shower = 0; shower < nShowers; ++shower) {
    std::vector<torch::jit::IValue> inputs{torch::tensor({energyGeV}, options), torch::tensor({thetaDeg}, options),
                                           torch::tensor({phiDeg}, options)};
    const auto start = std::chrono::steady_clock::now();
    at::Tensor result = module.forward(inputs).toTensor().contiguous();
    for (int i = 0; i < outputSize; ++i) {  // as TorchInference::runInference copies it
      output[i] = result.data_ptr<float>()[i];
    }
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    // convertOutput
    std::vector<std::vector<SpacePoint>> layers(nLayer);
    int numElements = 0;
    for (int l = 0; l < nLayer; ++l) {
      const int numSP = static_cast<int>(output[4 * l]);
      layers[l].reserve(numSP);
      numElements += 4 * numSP;
    }
    for (int i = 4 * nLayer; i < 4 * nLayer + numElements; i += 4) {
      const int layer = static_cast<int>(output[i + 2]);
      layers[layer].push_back({-output[i], -output[i + 1], output[i + 3]});
    }
    for (int l = 0; l < nLayer; ++l) {
      for (const auto& sp : layers[l]) {
        out << shower << ' ' << l << ' ' << sp.x << ' ' << sp.y << ' ' << sp.energy << '\n';
      }
    }
  }
  std::printf("%d showers at %g GeV: %.3f ms per shower (one thread, inference and copy)\n", nShowers, energyGeV,
              1e3 * seconds / nShowers);
  return 0;
}
