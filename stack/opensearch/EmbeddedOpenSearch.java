// A single-node OpenSearch started from Maven jars, for the local stack only.
//
// The sink talks to it over the REST API that OpenSearch 2.x shares with Elasticsearch
// 7.10+/8/9 (_bulk with external versions, index settings and mappings, search). Users run real
// Elasticsearch from docker-compose.yml; this class exists because these machines have no
// Docker and no way to download a server tarball.
//
// Usage: java -cp <classes>:<libs>/* EmbeddedOpenSearch <home-dir> <http-port> <transport-port>

import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Collection;
import java.util.Collections;
import java.util.List;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import org.opensearch.common.settings.Settings;
import org.opensearch.env.Environment;
import org.opensearch.node.InternalSettingsPreparer;
import org.opensearch.node.Node;
import org.opensearch.plugins.Plugin;

public final class EmbeddedOpenSearch {
  /** Node's constructor that takes classpath plugins is protected: subclass to reach it. */
  private static final class ClasspathPluginNode extends Node {
    ClasspathPluginNode(Environment environment, Collection<Class<? extends Plugin>> plugins) {
      super(environment, plugins, true);
    }
  }

  private static final List<String> PLUGINS = List.of(
      "org.opensearch.transport.Netty4Plugin",
      "org.opensearch.analysis.common.CommonAnalysisPlugin",
      "org.opensearch.index.mapper.MapperExtrasPlugin",
      "org.opensearch.index.reindex.ReindexPlugin",
      "org.opensearch.painless.PainlessPlugin");

  public static void main(String[] args) throws Exception {
    if (args.length != 3) {
      System.err.println("usage: EmbeddedOpenSearch <home-dir> <http-port> <transport-port>");
      System.exit(2);
    }
    Path home = Path.of(args[0]).toAbsolutePath();
    // modules/ and plugins/ stay empty: bundles found there would go through jar-hell checks.
    for (String dir : List.of("config", "data", "logs", "modules", "plugins")) {
      Files.createDirectories(home.resolve(dir));
    }
    Settings settings = Settings.builder()
        .put("cluster.name", "walsync-local")
        .put("node.name", "walsync-search-1")
        .put("path.home", home.toString())
        .put("path.data", home.resolve("data").toString())
        .put("path.logs", home.resolve("logs").toString())
        .put("network.host", "127.0.0.1")
        .put("http.port", args[1])
        .put("transport.port", args[2])
        .put("discovery.type", "single-node")
        .put("node.processors", Runtime.getRuntime().availableProcessors())
        // A nearly full CI disk must not flip indices to read-only behind the tests' back.
        .put("cluster.routing.allocation.disk.threshold_enabled", false)
        .put("action.auto_create_index", true)
        .build();
    Environment environment = InternalSettingsPreparer.prepareEnvironment(
        settings, Collections.emptyMap(), home.resolve("config"), () -> "walsync-search-1");

    List<Class<? extends Plugin>> plugins = new ArrayList<>();
    for (String name : PLUGINS) {
      plugins.add(Class.forName(name).asSubclass(Plugin.class)); // fails fast if a jar is missing
    }
    Node node = new ClasspathPluginNode(environment, plugins);
    CountDownLatch stopped = new CountDownLatch(1);
    Runtime.getRuntime().addShutdownHook(new Thread(() -> {
      try {
        node.close();
        node.awaitClose(30, TimeUnit.SECONDS);
      } catch (Exception e) {
        e.printStackTrace();
      }
      stopped.countDown();
    }));
    node.start();
    System.out.println("walsync-local search server listening on http://127.0.0.1:" + args[1]);
    stopped.await();
  }
}
